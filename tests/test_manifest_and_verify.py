"""The manifest as a contract: `sdc verify`/`sdc inspect`, tampering, future formats, and the
torch-free promise of everything the runtime side imports."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import assert_cli_torch_free, read_manifest, run_sdc
from sdc.errors import SdcError
from sdc.runtime.manifest import load_manifest, verify_files


@pytest.fixture
def copy_of(build_fp32, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(build_fp32, dst)
    return dst


def test_verify_and_inspect_a_good_build(build_fp32):
    proc = run_sdc("verify", build_fp32)
    assert "match the manifest" in proc.stdout and "4 graph schemas match" in proc.stdout
    out = run_sdc("inspect", build_fp32).stdout
    for stage in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert stage in out
    assert "parity max_rel" in out and "tiny-sd1" in out
    assert json.loads(run_sdc("inspect", build_fp32, "--json").stdout) == read_manifest(build_fp32)


def test_tampered_weights_are_caught(copy_of):
    data = copy_of / "unet" / "model.onnx_data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit, same size: only the hash can tell
    data.write_bytes(bytes(raw))
    proc = run_sdc("verify", copy_of, check=False)
    assert proc.returncode != 0 and "unet/model.onnx_data" in proc.stderr and "sha256" in proc.stderr
    assert run_sdc("verify", copy_of, "--no-hash", check=False).returncode == 0  # sizes still match


def test_truncated_and_missing_files_are_caught(copy_of):
    g = copy_of / "vae_decoder" / "model.onnx"
    g.write_bytes(g.read_bytes()[:100])
    (copy_of / "tokenizer" / "vocab.json").unlink()
    problems = verify_files(copy_of, load_manifest(copy_of), hashes=False)
    assert any("vae_decoder/model.onnx" in p and "bytes" in p for p in problems)
    assert any("vocab.json: missing" in p for p in problems)


def test_newer_format_and_foreign_manifests_are_refused(copy_of, tmp_path):
    m = read_manifest(copy_of)
    m["format_version"] = 99
    (copy_of / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SdcError, match="newer than this sdc reads"):
        load_manifest(copy_of)
    (copy_of / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(SdcError, match="not an sdc manifest"):
        load_manifest(copy_of)
    with pytest.raises(SdcError, match="artifacts not found"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    proc = run_sdc("verify", tmp_path / "empty", check=False)
    assert proc.returncode != 0 and proc.stderr.startswith("error: ") and "manifest" in proc.stderr


def test_runtime_side_never_imports_torch(build_fp32):
    import sdc.families  # noqa: F401 - the runtime reads the family specs; they must stay torch-free
    assert_cli_torch_free(["verify", build_fp32])
    assert_cli_torch_free(["inspect", build_fp32])


def test_runtime_never_imports_the_build_or_training_side():
    """The runtime ships alone on edge boxes: no module of runtime/ may import export/, training/ or
    eval/ (read from the source, so a lazy import inside a function counts; fusion's numpy paths
    are the run-time LoRA swap and stay torch-free, which `make runtime-check` proves)."""
    import re
    from pathlib import Path

    import sdc.runtime

    pattern = re.compile(r"^\s*(from|import)\s+(\.\.|sdc\.)(export|training|eval)\b", re.M)
    offenders = [f"{p.name}: {m.group(0).strip()}"
                 for p in sorted(Path(sdc.runtime.__file__).parent.glob("*.py"))
                 for m in pattern.finditer(p.read_text())]
    assert not offenders, offenders
