"""The compression compiler: int8 and 4-bit weight formats per stage, chosen to meet a quality
target, and w8a8 (8-bit activations too, for CPU speed), as an ONNX -> ONNX pass over any float
build (numpy, onnx and onnxruntime; no torch).

formats.py  the weight formats (encode/decode in numpy, exactly as DequantizeLinear decodes)
plan.py     recipes per --precision, layers kept in 16 bits, layer groups
graph.py    the graph rewrite (weight sites, DequantizeLinear insertion, streamed weights)
calibrate.py calibration inputs from the float build's own denoising trajectories
search.py   the quality-targeted mixed-precision search
static.py   w8a8: activation ranges calibrated, onnxruntime's quantize_static (QDQ), integer kernels
build.py    `sdc build --from ... --precision int8|int4|w8a8`: orchestration, gate, manifest
"""
