"""`sdc eval` (issue 13) through the real CLI: builds of one model side by side, quality against a
reference, graph drift that names the stage that drifted, sdc-tiny adherence, bad input refused in
one line with nothing written, torch-free; and the adherence detectors' move to sdc/eval/adherence.py
keeping their ground-truth scores.

Sizes are small on purpose (64 px, 2 prompts x 2 seeds, 4 steps for the random tiny SD1 model), so
the evals themselves cost seconds; the builds are the session fixtures plus one sdc-tiny fp16.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_cli_torch_free, read_manifest, run_sdc

SMALL = ("--width", "64", "--height", "64", "--steps", "4", "--seeds", "2")


def damage_unet(src: Path, dst: Path, rel: float, seed: int = 0) -> Path:
    """A copy of build `src` whose every float UNet weight got Gaussian noise of `rel` x that
    tensor's RMS, in place in unet/model.onnx_data (offsets from the manifest's weights.data), with
    the file's sha256 and bytes re-recorded so the build still verifies."""
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    weights = manifest["graphs"]["unet"]["weights"]
    rel_path = f"unet/{weights['data_file']}"
    data = np.memmap(dst / rel_path, np.uint8, mode="r+")
    rng = np.random.default_rng(seed)
    for offset, length, dtype, _ in weights["data"].values():
        t = data[offset:offset + length].view(dtype)
        if np.issubdtype(t.dtype, np.floating):
            w = t.astype(np.float64)
            t[:] = (w + rel * np.sqrt(np.mean(w ** 2)) * rng.standard_normal(w.shape)).astype(dtype)
    data.flush()
    del data
    blob = (dst / rel_path).read_bytes()
    manifest["files"][rel_path] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return dst


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("# two prompts\na lighthouse at dusk\n\na bowl of fruit\n")
    return p


@pytest.fixture(scope="module")
def sd1_eval(build_fp32, build_fp16, prompts_file, tmp_path_factory):
    """One eval of fp16, fp32 (given second: still the reference) and two damaged fp32 copies."""
    work = tmp_path_factory.mktemp("eval-sd1")
    d5 = damage_unet(build_fp32, work / "unet-noise-5pct", 0.05)
    d30 = damage_unet(build_fp32, work / "unet-noise-30pct", 0.30)
    out = work / "out"
    proc = run_sdc("eval", build_fp16, build_fp32, d5, d30, "--prompts", prompts_file, *SMALL,
                   "--provider", "cpu", "--out", out)
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    report = json.loads((out / "eval.json").read_text())
    return out, report, {r["name"]: r for r in report["builds"]}


def test_fp16_close_to_fp32_and_damage_is_seen_in_the_unet(sd1_eval, build_fp32):
    _, report, rows = sd1_eval
    assert report["settings"]["reference"] == build_fp32.name == report["builds"][0]["name"]
    fp16 = rows["tiny-fp16"]["quality"]
    assert fp16["psnr_db"]["mean"] >= 40 and fp16["psnr_db"]["worst"] >= 40, fp16["psnr_db"]
    assert fp16["ssim"]["mean"] >= 0.98 and fp16["ssim"]["worst"] >= 0.98, fp16["ssim"]
    # 5 % noise on every UNet weight: measured 41.8 dB on this random tiny model (fp16: ~65 dB),
    # 30 %: 27.2 dB. The drift table puts the damage in the UNet and nowhere else.
    assert rows["unet-noise-5pct"]["quality"]["psnr_db"]["mean"] < fp16["psnr_db"]["mean"] - 15
    assert rows["unet-noise-30pct"]["quality"]["psnr_db"]["mean"] < 30
    for name in ("unet-noise-5pct", "unet-noise-30pct"):
        g = rows[name]["graphs"]
        assert g["unet"]["rel_error"] > 0.1, g["unet"]
        assert g["text_encoder"]["rel_error"] == 0 and g["vae_decoder"]["rel_error"] == 0, g
    g16 = rows["tiny-fp16"]["graphs"]
    assert 0 < g16["unet"]["rel_error"] < 1e-2 and g16["unet"]["psnr_db"] > 50, g16["unet"]
    ref = rows[build_fp32.name]
    assert ref["quality"]["psnr_db"]["mean"] == 100 and ref["quality"]["max_abs"]["worst"] == 0


def test_costs_are_measured_per_build_and_stage(sd1_eval, build_fp32, build_fp16):
    _, report, rows = sd1_eval
    for r in report["builds"]:
        size = r["size"]
        assert size["total_bytes"] > sum(size["stages"][s] for s in ("text_encoder", "unet"))
        assert set(r["load_seconds"]) >= {"text_encoder", "unet", "vae_decoder"}
        t = r["time_per_image"]
        assert len(t["all_s"]) == 4 and t["n"] == 3 and t["mean_s"] > 0 and t["std_s"] >= 0
        assert r["peak_bytes"] is None or r["peak_bytes"] > 0
        assert r["providers"] == ["CPUExecutionProvider"]
        assert r["adherence"] is None  # not sdc-tiny
    # weight bytes by dtype read from the manifest; the fp16 build's UNet weights are fp16
    assert set(rows["tiny-fp16"]["size"]["weights_by_dtype"]["unet"]) == {"float16"}
    assert set(rows[build_fp32.name]["size"]["weights_by_dtype"]["unet"]) == {"float32"}
    unet_bytes = sum(rows["tiny-fp16"]["size"]["weights_by_dtype"]["unet"].values())
    expected = sum(v[1] for v in read_manifest(build_fp16)["graphs"]["unet"]["weights"]["data"]
                   .values())
    assert unet_bytes == expected
    assert rows["tiny-fp16"]["compression"] > 1.1
    assert report["settings"]["prompts"] == ["a lighthouse at dusk", "a bowl of fruit"]
    assert report["versions"]["scikit-image"] and report["machine"]["cores"] >= 1


def test_outputs_parse(sd1_eval):
    out, report, rows = sd1_eval
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md", "grid.png"]
    md = (out / "eval.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "(fp" in line]
    assert len(table) == len(rows) == 4
    grid = Image.open(out / "grid.png")
    grid.load()
    # rows: 4 builds + 3 heat maps of 128 px cells (64 px enlarged x2); columns: 4 pairs
    from sdc.eval.grid import GAP, HEADER_H, LABEL_W

    assert grid.size == (LABEL_W + 4 * (128 + GAP), HEADER_H + 7 * (128 + GAP))
    # the atomic writes left no temporary files behind
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory) -> Path:
    """The shipped sdc-tiny built fp16 (~40 s), once for this module."""
    out = tmp_path_factory.mktemp("tiny16") / "sdc-tiny-fp16"
    run_sdc("build", "--precision", "fp16", "--out", out)
    return out


def test_sdc_tiny_adherence_fp32_vs_fp16_torch_free(builtin_build, tiny_fp16, tmp_path):
    out = tmp_path / "eval"
    # the whole eval in a fresh interpreter that must never import torch
    assert_cli_torch_free(["eval", tiny_fp16, builtin_build, "--seeds", "2", "--provider", "cpu",
                           "--out", out, "-q"])
    report = json.loads((out / "eval.json").read_text())
    fp32, fp16 = report["builds"]
    assert fp32["name"] == builtin_build.name  # the fp32 build is the reference by default
    n = fp32["adherence"]["n"]
    assert n == 4 == fp16["adherence"]["n"]
    for aspect in ("colour", "background", "shape"):
        # equal within one image: one image is 100 / n percentage points
        assert abs(fp32["adherence"][aspect] - fp16["adherence"][aspect]) <= 100 / n + 1e-9
    assert fp16["quality"]["psnr_db"]["mean"] >= 40, fp16["quality"]
    assert "%" in (out / "eval.md").read_text().split("sdc-tiny-fp16")[1].splitlines()[0]


def _refused(proc, *needles, out: Path | None = None):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists(), "a refused eval wrote its output folder"


def test_bad_input_is_one_line_and_writes_nothing(build_fp32, builtin_build, prompts_file,
                                                  tmp_path):
    out = tmp_path / "out"
    _refused(run_sdc("eval", build_fp32, builtin_build, "--out", out, check=False),
             builtin_build.name, "sdc-tiny", "--allow-different-models", out=out)
    _refused(run_sdc("eval", build_fp32, tmp_path / "missing", "--out", out, check=False),
             "missing", "not found", out=out)
    _refused(run_sdc("eval", build_fp32, "--seeds", "0", "--out", out, check=False),
             "--seeds 0", out=out)
    _refused(run_sdc("eval", build_fp32, "--prompts", tmp_path / "none.txt", "--out", out,
                     check=False), "--prompts", "cannot read", out=out)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    _refused(run_sdc("eval", build_fp32, "--prompts", empty, "--out", out, check=False),
             "no prompts", out=out)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    _refused(run_sdc("eval", build_fp32, "--out", busy, check=False), "holds other files",
             "keep.txt")
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    # a build without a stage the reference's pipeline needs
    no_unet = tmp_path / "no-unet"
    shutil.copytree(build_fp32, no_unet)
    m = read_manifest(no_unet)
    del m["graphs"]["unet"]
    m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("unet/")}
    m.pop("memory_profile", None)
    (no_unet / "manifest.json").write_text(json.dumps(m))
    _refused(run_sdc("eval", build_fp32, no_unet, "--out", out, check=False),
             "no-unet", "no unet graph", out=out)


# --- the detectors after their move (training/shape_score.py -> sdc/eval/adherence.py) -----------

# Measured with the hand-written detectors just before the move (label propagation, monotone-chain
# hull, hand-coded Lab): (scenes, seed, size) -> colour / background / shape accuracy, %. The
# library-based detectors gave the identical detection on each of these 700 scenes.
BEFORE_MOVE = {(200, 20240611, 64): (100.0, 100.0, 100.0), (300, 7, 64): (100.0, 100.0, 100.0),
               (100, 11, 32): (100.0, 100.0, 99.0), (100, 12, 128): (100.0, 100.0, 100.0)}


@pytest.mark.parametrize("n,seed,size", list(BEFORE_MOVE))
def test_adherence_scores_ground_truth_as_before_the_move(n, seed, size):
    from sdc.eval.adherence import score, summarise
    from sdc.training.shapes import make_dataset

    data = make_dataset(n, seed, size)
    got = summarise([score(im, {"colour": s.colour, "background": s.background, "shape": s.shape})
                     for im, s in zip(data.images, data.scenes)])
    assert (got["colour"], got["background"], got["shape"]) == BEFORE_MOVE[(n, seed, size)], got


def test_old_import_path_is_the_new_module():
    from sdc.eval import adherence
    from sdc.training import shape_score

    assert shape_score.score is adherence.score and shape_score.detect is adherence.detect
    assert shape_score.nearest_colour is adherence.nearest_colour
    assert adherence.expected_for("a red circle on a blue background") == \
        {"shape": "circle", "colour": "red", "background": "blue"}
    assert adherence.expected_for("a lighthouse at dusk") is None
