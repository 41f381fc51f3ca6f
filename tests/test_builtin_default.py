"""`sdc build` with no MODEL: the built-in stand-in, labelled as such, deterministic, cached."""

from __future__ import annotations

from conftest import read_manifest, run_sdc


def test_builtin_build_is_labelled_and_reused(tmp_path):
    proc = run_sdc("build", "--precision", "fp32", "--stages", "text_encoder,vae_decoder",
                   cwd=tmp_path)
    out = tmp_path / "artifacts" / "sdc-tiny-random-fp32"
    assert proc.stdout.strip() == str(out)
    assert "stand-in" in proc.stderr and "random weights" in proc.stderr
    m = read_manifest(out)
    assert m["base_model"]["stand_in"] is True and m["base_model"]["kind"] == "builtin-random"
    assert "random weights" in m["base_model"]["note"]
    # the stand-in is generated from a fixed seed: same weights, same key, so the build is reused
    again = run_sdc("build", "--precision", "fp32", "--stages", "text_encoder,vae_decoder",
                    cwd=tmp_path)
    assert "up to date" in again.stderr
    assert "STAND-IN" in run_sdc("inspect", out).stdout
