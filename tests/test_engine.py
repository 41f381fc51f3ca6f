"""The runtime Engine: residency under a budget (measured, in a fresh interpreter), adapter slots
bound to a resident session equal to the graph's own weights, the adapter cache's byte bound, and
`<lora:NAME:WEIGHT>` tags resolved by name inside one folder only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import read_manifest
from lora_files import make_peft_lora

PROMPT = "a red circle on a blue background"


def test_residency_follows_the_budget(builtin_build):
    """Budget = the plan's resident peak: every session stays loaded across requests (created
    once) and each request's peak, counted from before they were loaded, stays under it. One byte
    below every plan's resident peak: the same requests run streamed (sessions created per
    request), under it too."""
    code = (
        "import json, numpy as np\n"
        "from sdc.runtime.engine import Engine\n"
        "from sdc.runtime.pipeline import GenerateOptions, plan_run\n"
        "from sdc.runtime.planner import candidate_plans\n"
        f"opts = GenerateOptions(prompt={PROMPT!r}, artifacts={str(builtin_build)!r}, steps=2,"
        " seed=0, provider='cpu', width=64, height=64)\n"
        "plan, manifest, full = plan_run(opts)\n"
        "every = candidate_plans(manifest, batch=1, cfg=full.guidance > 1, width=64, height=64,"
        " steps=2, budget=1)\n"
        "# below every candidate's resident peak (a budget may pick a CFG-split plan, smaller)\n"
        "low = min(p.resident_peak for p in every if p.resident_peak is not None)\n"
        "out = {'resident_peak': plan.resident_peak, 'peak': plan.peak}\n"
        "for name, budget in (('fits', plan.resident_peak), ('streams', low - 1)):\n"
        "    e = Engine(opts.artifacts, provider='cpu', keep_sessions=True, vram_budget=budget)\n"
        "    e.verify()\n"
        "    rs = [e.generate(opts) for _ in range(3)]\n"
        "    out[name] = {'peaks': [r.memory['peak_bytes'] for r in rs], 'budget': budget,\n"
        "                 'resident': len(e._sessions), 'created': e.stats.sessions_created,\n"
        "                 'image': np.asarray(rs[-1].images[0]).tolist(),\n"
        "                 'same': all(np.array_equal(np.asarray(rs[0].images[0]),\n"
        "                                            np.asarray(r.images[0])) for r in rs)}\n"
        "    e.close()\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    fits, streams = out["fits"], out["streams"]
    assert fits["resident"] == 3 and fits["created"] == 3  # text_encoder, unet, vae_decoder once
    assert streams["resident"] == 0 and streams["created"] == 9
    for run in (fits, streams):
        assert run["same"] and all(p <= run["budget"] for p in run["peaks"]), run["peaks"]
    assert fits["image"] == streams["image"]
    assert out["resident_peak"] > out["peak"]


@pytest.fixture(scope="module")
def adapters(tiny_folder, tmp_path_factory):
    d = tmp_path_factory.mktemp("engine-loras")
    return [make_peft_lora(tiny_folder, d / f"l{i}", seed=30 + i, scale=1.0) for i in range(3)]


def test_bound_base_weights_equal_the_graphs_own(build_fp32):
    """Binding the base weights to every adapter slot gives the unbound run's output bit for bit:
    a slot is only another way of giving the session its weight."""
    from sdc.fusion.artifact import read_weight
    from sdc.runtime.sessions import open_session

    m = read_manifest(build_fp32)
    g = m["graphs"]["unet"]
    w = g["weights"]
    assert len(w["slots"]) > 40
    base = {name: read_weight(build_fp32 / "unet" / w["data_file"], w["data"][name])
            for name in w["slots"]}
    s = open_session(build_fp32, "unet", g, "cpu")
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
             "timestep": np.array([500, 500], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    plain = s.run(feeds, 1)
    np.testing.assert_array_equal(s.run(feeds, 1, bound=s.slot_values(base)), plain)
    moved = {k: v * np.float32(1.01) for k, v in base.items()}
    assert np.abs(s.run(feeds, 1, bound=s.slot_values(moved)) - plain).max() > 0


def test_adapter_cache_is_bounded_in_bytes(build_fp32, adapters):
    from sdc.fusion.fuse import LoraSpec
    from sdc.runtime.engine import Engine

    e = Engine(build_fp32, keep_sessions=True)
    one = e.adapter_set([LoraSpec(adapters[0])], print)
    size = one.nbytes
    e.adapters.limit = int(size * 2.5)  # room for two sets
    for path in adapters[1:]:
        e.adapter_set([LoraSpec(path)], print)
    assert e.adapters.stats.evictions == 1 and len(e.adapters.entries) == 2
    assert e.adapters.bytes <= e.adapters.limit
    again = e.adapter_set([LoraSpec(adapters[2])], print)
    assert e.adapters.stats.hits == 1 and again.key[0][1] == 1.0
    e.adapters.limit = size - 1  # a set larger than the cache is used, not kept
    e.adapter_set([LoraSpec(adapters[0], 0.5)], print)
    assert e.adapters.stats.misses == 4 and len(e.adapters.entries) == 2


def test_lora_tags(tmp_path):
    from sdc.errors import SdcError
    from sdc.runtime.prompt_loras import lora_index, resolve_tags, split_prompt

    text, tags = split_prompt("a <lora:seal:0.8> cat, <LORA:style>  in snow <lyco:x:-1>")
    assert text == "a cat, in snow" and [(t.name, t.weight) for t in tags] == \
        [("seal", 0.8), ("style", 1.0), ("x", -1.0)]
    for bad, needle in (("<lora:../up:1>", "not a path"), ("<lora:/etc/x>", "not a path"),
                        ("<lora:a/b>", "not a path"), ("<lora:x:nan>", "not a number"),
                        ("<lora:x:1e9>", "not a number"), ("<lora:x:1:down=0>", "block")):
        with pytest.raises(SdcError, match=needle):
            split_prompt(bad)
    (tmp_path / "loras" / "sub").mkdir(parents=True)
    (tmp_path / "loras" / "seal.safetensors").write_bytes(b"x")
    (tmp_path / "loras" / "sub" / "style.safetensors").write_bytes(b"x")
    (tmp_path / "loras" / "sub" / "seal.safetensors").write_bytes(b"x")  # a second "seal"
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "outside.safetensors", tmp_path / "loras" / "escape.safetensors")
    index = lora_index(tmp_path / "loras")
    assert set(index) == {"seal", "style"} and index["seal"] is None  # no link out; ambiguous
    assert resolve_tags(split_prompt("<lora:style:0.5>")[1], tmp_path / "loras")[0].weight == 0.5
    for prompt, needle in (("<lora:seal>", "several files"), ("<lora:escape>", "no LoRA of that"),
                           ("<lora:nothere>", "available: style")):
        with pytest.raises(SdcError, match=needle):
            resolve_tags(split_prompt(prompt)[1], tmp_path / "loras")
    with pytest.raises(SdcError, match="--lora-dir"):
        resolve_tags(split_prompt("<lora:style>")[1], None)
