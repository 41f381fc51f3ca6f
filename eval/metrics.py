"""The numbers `sdc eval` compares builds by: image quality against a reference picture (PSNR, SSIM,
max abs pixel error), graph-output drift against the reference build's same graph (relative error,
PSNR over the reference's range), and the mean ± std / worst summaries of both. Torch-free.

SSIM is scikit-image's `structural_similarity` (Wang et al. 2004, 7x7 uniform window), not our own:
SSIM has enough knobs (window, constants, data range) that a hand-written one is a second,
disagreeing definition of the same word.
"""

from __future__ import annotations

import math

import numpy as np

# PSNR of identical pictures is infinite; JSON cannot hold inf, and a table wants a number, so
# identical images report this cap (1/255 of one level of error over a whole 8-bit image is ~96 dB).
PSNR_CAP = 100.0


def _u8(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3:
        raise ValueError(f"expected an (H, W, C) uint8 image, got {arr.dtype} {arr.shape}")
    return arr[..., :3]


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of `a` against `b` (capped at PSNR_CAP)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    if mse == 0.0 or data_range <= 0:
        return PSNR_CAP if mse == 0.0 else 0.0
    return min(PSNR_CAP, 10.0 * math.log10(data_range ** 2 / mse))


def image_quality(image, reference) -> dict[str, float]:
    """PSNR, SSIM and max abs pixel error (0-255) of one 8-bit RGB image against the reference."""
    from skimage.metrics import structural_similarity

    a, b = _u8(image), _u8(reference)
    if a.shape != b.shape:
        raise ValueError(f"image {a.shape} and reference {b.shape} differ in size")
    ssim = structural_similarity(a, b, channel_axis=-1, data_range=255)
    return {"psnr_db": psnr(a, b), "ssim": float(ssim),
            "max_abs": int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())}


def graph_drift(output: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How far one graph's output is from the reference build's same graph on the same inputs:
    relative L2 error ||a - b|| / ||b||, max abs error, and PSNR with the reference output's own
    peak-to-peak range as the data range (graph outputs are not pixels: noise predictions, hidden
    states, latents, each with its own scale)."""
    a = np.asarray(output, np.float64)
    b = np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"output {a.shape} and reference output {b.shape} differ in shape")
    if not np.isfinite(a).all():
        return {"rel_error": None, "max_abs": None, "psnr_db": 0.0, "finite": False}  # JSON has no inf
    norm = float(np.linalg.norm(b))
    err = float(np.linalg.norm(a - b))
    return {"rel_error": err / norm if norm else (0.0 if err == 0 else math.inf),
            "max_abs": float(np.abs(a - b).max()),
            "psnr_db": psnr(a, b, float(b.max() - b.min())), "finite": True}


def spread(values) -> dict[str, float | int | None]:
    """mean, std (population), min, max and count of a list of numbers; None entries for none."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "max": float(v.max()), "n": int(v.size)}


def quality_summary(per_image: list[dict]) -> dict:
    """Aggregate image_quality() results: mean ± std of each metric and the worst image (lowest
    PSNR / SSIM, highest max abs error)."""
    out = {}
    for key in ("psnr_db", "ssim", "max_abs"):
        s = spread([q[key] for q in per_image])
        s["worst"] = s["max"] if key == "max_abs" else s["min"]
        out[key] = s
    return out
