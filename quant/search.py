"""Quality-targeted mixed precision: quantize every weight, measure, and keep the most sensitive
layer groups in fp16 until the graph meets its PSNR target on real calibration inputs.

Every measurement (the worst PSNR over the calibration inputs and the spec's parity cases, the
inputs the gate checks) runs the *float* source graph with fake-quantized weights handed to
onnxruntime at session creation (`add_external_initializers`): the decoded weights are the ones
the quantized graph computes with (quant/formats.py), so no graph is rewritten per trial. The
reference is the same float graph with its own weights, on the same inputs.

  1. all weights in their format (the real quantized graph, measured by the caller): PSNR meets
     the target -> done (sensitivities are measured only when asked, `measure_all`, since each
     costs one graph evaluation);
  2. else each group alone in its format, the rest float: that group's sensitivity (dB);
  3. groups restored to fp16 most-sensitive-first; the fewest restored that meet the target is
     found by bisection over the count (PSNR rises as groups are restored) and checked;
  4. all groups at fp16 and still short: refused, with the best value and the groups that cost
     the most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SdcError
from . import formats as fm


def judge_copy(src: Path, work: Path) -> Path:
    """A copy of graph `src` in `work` whose every weight is external data, so each can be
    replaced at session creation (onnxruntime replaces only external initializers): inline
    weights move to a side file, the source's data files are hard-linked (copied where links
    fail). Returns the copy's model path."""
    import os
    import shutil

    import onnx

    from ..runtime import store

    proto = onnx.load(str(src), load_external_data=False)
    work.mkdir(parents=True, exist_ok=True)
    linked = set()
    with open(work / "inline.bin", "wb") as side:
        pos = 0
        for t in proto.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                loc = {e.key: e.value for e in t.external_data}["location"]
                if loc not in linked:
                    source = store.contained(src.parent, loc, f"external data of {t.name}")
                    try:
                        os.link(source, work / loc)
                    except OSError:
                        shutil.copy2(source, work / loc)
                    linked.add(loc)
                continue
            if len(t.dims) < 2 or not t.raw_data:
                continue
            raw = t.raw_data
            side.write(raw)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", "inline.bin"), ("offset", str(pos)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            pos += len(raw)
    onnx.save(proto, str(work / "model.onnx"))
    return work / "model.onnx"


def run_graph(path: Path, feeds: list[dict], weights: dict[str, np.ndarray] | None = None,
              level: str = "basic") -> list[np.ndarray]:
    """The graph's first output on each feed (CPU, at the optimisation `level` the runtime
    opens it at: runtime/sessions.py LEVELS), with `weights` replacing external initializers
    by name."""
    import onnxruntime as ort

    from ..runtime.sessions import apply_level, override_initializers

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    apply_level(opts, level)
    # no MLAS pre-packing: these sessions live for a few runs, and packing would copy every
    # weight once more (the search's peak memory)
    opts.add_session_config_entry("session.disable_prepacking", "1")
    keep = override_initializers(opts, weights)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    outs = [session.run(None, f)[0] for f in feeds]
    del session, keep
    return outs


class Judge:
    """PSNR of a graph's output with some weights replaced, against the graph's own output.
    `onnx_path` must hold every weight as external data (`judge_copy`)."""

    def __init__(self, onnx_path: Path, feeds: list[dict], base: dict[str, np.ndarray] | None = None,
                 reference: list[np.ndarray] | None = None):
        self.path, self.feeds, self.base = onnx_path, feeds, dict(base or {})
        self.reference = reference if reference is not None else self._outputs({})
        self.evaluations = 0

    def _outputs(self, overrides: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run_graph(self.path, self.feeds, {**self.base, **overrides})

    def psnr(self, overrides: dict[str, np.ndarray]) -> float:
        self.evaluations += 1
        outs = self._outputs(overrides)
        return min(fm.psnr(r, o) for r, o in zip(self.reference, outs))


@dataclass
class SearchResult:
    formats: dict[str, str]  # initializer -> format
    achieved_db: float
    sensitivities: dict[str, float] = field(default_factory=dict)  # group -> dB alone
    restored: list[str] = field(default_factory=list)  # groups kept in fp16 to meet the target
    evaluations: int = 0


def search(judge: Judge, weights: dict[str, dict], target: float, measure_all: bool,
           log: Callable[[str], None], stage: str, achieved: float) -> SearchResult:
    """`weights`: {initializer: {"format", "group", "decoded", "fp16"}} for every weight the
    stage's plan changes; "decoded" and "fp16" are callables giving the weight in its format and
    rounded to half, in the graph's type (computed per trial, so at most one trial's weights are
    in memory). `achieved`: the PSNR with every weight in its format, measured on the real
    quantized graph. Returns the formats that meet `target`."""
    formats = {i: w["format"] for i, w in weights.items()}
    quantized = {i for i, w in weights.items() if fm.get(w["format"]).quantized}
    groups: dict[str, list[str]] = {}
    for i in sorted(quantized):
        groups.setdefault(weights[i]["group"], []).append(i)
    met = target is None or achieved >= target
    sens: dict[str, float] = {}
    if measure_all or not met:
        for g, members in groups.items():
            sens[g] = judge.psnr({i: weights[i]["decoded"]() for i in members})
        worst = sorted(sens, key=sens.get)[:3]
        log(f"[{stage}] sensitivity of {len(sens)} groups measured; most sensitive: "
            + ", ".join(f"{g} {sens[g]:.1f} dB" for g in worst))
    if met:
        return SearchResult(formats, achieved, sens, [], judge.evaluations)
    order = sorted(groups, key=sens.get)

    def trial(k: int) -> dict[str, np.ndarray]:
        restored = {i for g in order[:k] for i in groups[g]}
        return {i: (weights[i]["fp16"]() if i in restored and weights[i]["format"] != "fp16"
                    else weights[i]["decoded"]()) for i in weights}

    best = judge.psnr(trial(len(order)))
    if best < target:
        raise SdcError(
            f"--quality-target {target:g} dB cannot be met for {stage}: with every layer group "
            f"at fp16 it reaches {best:.2f} dB; the groups that cost the most are "
            + ", ".join(f"{g} ({sens[g]:.1f} dB alone)" for g in order[:3])
            + "; lower the target or keep the stage fp32 (--stage-precision "
            f"{stage}=fp32)")
    lo, hi, at_hi = 0, len(order), best  # psnr(lo) < target <= psnr(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        value = judge.psnr(trial(mid))
        if value >= target:
            hi, at_hi = mid, value
        else:
            lo = mid
    for g in order[:hi]:
        for i in groups[g]:
            formats[i] = "fp16"
    log(f"[{stage}] kept {hi} of {len(order)} groups in fp16 to meet {target:g} dB: "
        f"{at_hi:.2f} dB")
    return SearchResult(formats, at_hi, sens, order[:hi], judge.evaluations)
