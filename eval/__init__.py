"""`sdc eval` as a library: compare builds of one model side by side (size, load and run time, peak
memory, PSNR/SSIM against a reference build, per-graph drift, sdc-tiny prompt adherence).
Torch-free, like the runtime it drives.

    from sdc.eval import EvalOptions, evaluate
    result = evaluate(EvalOptions(builds=("artifacts/sdc-tiny-fp32", "artifacts/sdc-tiny-fp16")))
    result.report["builds"][1]["quality"]["psnr_db"]["mean"]
"""

from .study import EvalOptions, EvalResult, evaluate

__all__ = ["EvalOptions", "EvalResult", "evaluate"]
