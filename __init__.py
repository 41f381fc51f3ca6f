"""sdc: a compiler toolchain for Stable Diffusion v1.x.

`sdc build` (sdc.export) turns SD1.x weights into per-stage ONNX graphs plus a manifest;
`sdc run` (sdc.runtime) runs them without torch. The manifest is the only contract between them.
"""

__version__ = "0.1.0"
