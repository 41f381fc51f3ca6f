"""--stage-provider: stages placed on the CPU beside a device run are counted in host memory, apart
from --vram-budget (runtime/placement.py, runtime/planner.py). The CUDA side needs a GPU; the
accounting is the planner's and is checked here on the build's measured profile."""

from __future__ import annotations

import pytest

from conftest import read_manifest, run_sdc

from sdc.errors import SdcError
from sdc.runtime.placement import host_stages, parse_stage_providers
from sdc.runtime.planner import make_plan

KW = dict(batch=1, cfg=True, width=128, height=128, steps=4)
STAGES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def test_parse_and_host_stages():
    assert parse_stage_providers("vae_decoder=cpu, text_encoder=cpu", STAGES) == {
        "vae_decoder": "cpu", "text_encoder": "cpu"}
    assert parse_stage_providers(None, STAGES) == {}
    for bad, needle in (("vae=cpu", "no stage 'vae'"), ("vae_decoder=tpu", "expected one of"),
                        ("vae_decoder", "STAGE=PROVIDER")):
        with pytest.raises(SdcError, match=needle):
            parse_stage_providers(bad, STAGES)
    placed = {"vae_decoder": "cpu", "unet": "cuda"}
    assert host_stages("cuda", placed, cuda_available=True) == {"vae_decoder"}
    assert host_stages("auto", placed, cuda_available=True) == {"vae_decoder"}
    # a CPU run has one memory: nothing is set apart from the budget
    assert host_stages("auto", placed, cuda_available=False) == set()
    assert host_stages("cpu", placed, cuda_available=True) == set()


def test_host_stage_is_outside_the_budget(build_fp32):
    m = read_manifest(build_fp32)
    plain = make_plan(m, **KW)
    placed = make_plan(m, **KW, host=frozenset({"vae_decoder"}))
    dec = next(s for s in placed.stages if s.stage == "vae_decoder")
    assert dec.host and placed.host_peak == dec.peak
    device = [s.peak for s in placed.stages if s.stage != "vae_decoder"]
    assert placed.peak == max(device) <= plain.peak
    assert any("host memory" in line for line in placed.describe())
    # a budget between the device stages' peak and the decoder's fits only with the VAE on the
    # host: the same budget without the placement is refused (when the decoder is the largest)
    if dec.peak > max(device):
        budget = max(device) + (dec.peak - max(device)) // 2
        assert make_plan(m, **KW, budget=budget, host=frozenset({"vae_decoder"})).peak <= budget


def test_cli_plan_reports_the_host_stage(build_fp32):
    proc = run_sdc("run", "-a", build_fp32, "a cat", "--provider", "cuda", "--stage-provider",
                   "vae_decoder=cpu", "--plan", "--width", "64", "--height", "64")
    assert "host memory" in proc.stdout and "host        peak" in proc.stdout, proc.stdout
    proc = run_sdc("run", "-a", build_fp32, "a cat", "--stage-provider", "vae=cpu", "--plan",
                   check=False)
    assert proc.returncode != 0 and "no stage 'vae'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cpu_placement_runs_the_same_image(build_fp32, tmp_path):
    from sdc.runtime.pipeline import GenerateOptions, run_pipeline

    opts = dict(prompt="a cat", artifacts=build_fp32, steps=2, width=64, height=64, seed=1)
    a = run_pipeline(GenerateOptions(**opts)).images[0]
    r = run_pipeline(GenerateOptions(**opts, stage_providers="vae_decoder=cpu"))
    assert r.providers["vae_decoder"].startswith("CPU")
    assert a.tobytes() == r.images[0].tobytes()
