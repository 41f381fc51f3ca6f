"""Run side: torch-free (onnxruntime, numpy, tokenizers, pillow). Reads only the manifest.

    from sdc.runtime import generate
    images = generate("a red circle on a blue background", artifacts="artifacts/sdc-tiny-fp32")
"""

from .pipeline import GenerateOptions, GenerateResult, generate, run_pipeline

__all__ = ["GenerateOptions", "GenerateResult", "generate", "run_pipeline"]
