"""Output safety and caching: an interrupted or failed build leaves nothing that looks complete,
a good build survives a failed rebuild, and identical inputs reuse the build by content key."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import read_manifest, run_sdc
from sdc.errors import ParityError

TE_ONLY = ("--stages", "text_encoder")


def _start_build(model, out):
    cmd = [sys.executable, "-m", "sdc.cli.main", "build", str(model), "--precision", "fp32",
           "--out", str(out)]
    # A shell's background jobs inherit SIGINT as ignored (CI runs us that way); restore the
    # default so the child behaves like a build in a user's terminal.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_mid_build(parent, proc, timeout=300):
    """Block until the first graph is on disk in the temp dir (the build is half done)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if list(parent.glob(".sdc-tmp-*/text_encoder/model.onnx")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("build never reached its first graph")


def _manifests(parent):
    return [p for p in parent.rglob("manifest.json")]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_interrupted_build_leaves_no_complete_looking_output(tiny_folder, tmp_path, sig):
    out = tmp_path / "art"
    proc = _start_build(tiny_folder, out)
    _wait_mid_build(tmp_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not out.exists()
    assert _manifests(tmp_path) == []
    if sig != signal.SIGKILL:  # a clean interrupt also removes its temp dir and says so
        assert "interrupted" in err and "Traceback" not in err
        assert list(tmp_path.glob(".sdc-tmp-*")) == []
    else:  # a killed build's temp dir is hidden, has no manifest, and the next build removes it
        assert list(tmp_path.glob(".sdc-tmp-*"))
        run_sdc("build", tiny_folder, "--precision", "fp32", "--out", out, *TE_ONLY)
        assert list(tmp_path.glob(".sdc-tmp-*")) == []
        assert _manifests(tmp_path) == [out / "manifest.json"]


def test_same_inputs_reuse_the_build_and_force_rebuilds(tiny_folder, tmp_path):
    out = tmp_path / "te"
    run_sdc("build", tiny_folder, "--precision", "fp32", "--out", out, *TE_ONLY)
    first = read_manifest(out)
    proc = run_sdc("build", tiny_folder, "--precision", "fp32", "--out", out, *TE_ONLY)
    assert "up to date" in proc.stderr
    assert read_manifest(out) == first
    time.sleep(1.1)  # `created` has one-second resolution
    run_sdc("build", tiny_folder, "--precision", "fp32", "--out", out, *TE_ONLY, "--force")
    forced = read_manifest(out)
    assert forced["build_key"] == first["build_key"] and forced["created"] != first["created"]
    # another precision is another key: the old build at that path is replaced, not reused
    run_sdc("build", tiny_folder, "--precision", "fp16", "--out", out, *TE_ONLY)
    assert read_manifest(out)["build_key"] != first["build_key"]


def test_changed_weights_change_the_key(tiny_folder, tmp_path):
    import shutil

    from sdc.export.build import BuildOptions, _versions, build_key
    from sdc.export.sources import resolve_model

    copy = tmp_path / "copy"
    shutil.copytree(tiny_folder, copy)
    opts = BuildOptions(model=str(copy))
    key = lambda: build_key(resolve_model(str(copy)).content_hash(), opts, _versions())  # noqa: E731
    before = key()
    assert key() == before
    w = copy / "text_encoder" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF  # one bit of one weight
    w.write_bytes(bytes(data))
    assert key() != before


def test_parity_failure_fails_the_build_and_keeps_the_old_one(tiny_folder, tmp_path,
                                                                monkeypatch, capsys):
    from sdc.cli.main import main
    from sdc.export import parity

    out = tmp_path / "te"
    run_sdc("build", tiny_folder, "--precision", "fp32", "--out", out, *TE_ONLY)
    good = read_manifest(out)

    real = parity.torch_references

    def skewed(graph, spec, feeds):  # a torch reference the ONNX graph cannot match
        return {k: v * np.float32(1.01) for k, v in real(graph, spec, feeds).items()}

    monkeypatch.setattr(parity, "torch_references", skewed)
    with pytest.raises(SystemExit) as exc:
        main(["build", str(tiny_folder), "--precision", "fp32", "--out", str(out), *TE_ONLY,
              "--force"])
    assert exc.value.code == ParityError.exit_code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: parity failed for graph text_encoder")
    assert "max_rel" in err and "0.0001" in err
    assert read_manifest(out) == good  # the previous build is untouched
    assert list(tmp_path.glob(".sdc-tmp-*")) == []


def test_parity_gate_rejects_nan_and_wrong_shapes():
    from sdc.export.parity import compare
    from sdc.families.sd1 import UNET

    ref = np.ones((1, 4, 2, 2), np.float32)
    assert compare(ref, ref.copy(), "fp32", UNET)["passed"]
    bad = ref.copy()
    bad[0, 0, 0, 0] = np.nan
    assert not compare(ref, bad, "fp16", UNET)["passed"]
    assert not compare(ref, ref[:, :, :1], "fp32", UNET)["passed"]
    noisy = ref + np.random.default_rng(0).normal(0, 0.1, ref.shape).astype(np.float32)
    assert not compare(ref * np.arange(16).reshape(ref.shape), noisy, "fp16", UNET)["passed"]
