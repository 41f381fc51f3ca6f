"""`sdc build --from FLOAT-BUILD --precision int8|int4 [--stage-precision ...] [--lora ...]`:
a quantized build from a float one, torch-free (onnx + onnxruntime + numpy).

Flow: verify the float build's every hash -> fuse any LoRAs into its float weights (fusion/,
"fused before quant") -> calibration inputs from its own trajectories -> per stage: encode every
weight, search the layer formats that meet the quality target (quant/search.py), rewrite the graph
(quant/graph.py), and gate the real quantized graph against the float one -> UNet chunks re-cut
and VAE segments rewritten with the same formats, each gated -> measured memory profile ->
manifest written last and the directory swapped into place (runtime/store.py).

The gate's reference is the float build's graph, which its own build gated against the torch
fp32 module at max_rel <= 1e-4 (a relative error of 1e-4 is ~80 dB, so the PSNR against torch
differs from the one recorded by far less than the 0.01 dB it is reported to).

A quantized build records its float source (`quantized_from`); LoRAs for it are fused there and
quantized again, never into dequantized weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import ParityError, SdcError
from ..runtime import manifest as mf
from ..runtime import store
from ..families import dims_of, of_manifest
from . import formats as fm
from . import plan as qp
from . import static

QUANT_VERSION = 2  # part of the build key: a change to the encoders or the rewrite rebuilds
DATA_FILE = "model.onnx_data"
EXECUTION = {
    "cpu": "DequantizeLinear feeding Conv/Gemm/MatMul/Gather, float32 arithmetic: the weights "
           "stay 8/4-bit in memory (onnxruntime does not fold DequantizeLinear at the runtime's "
           "optimisation level) and are expanded one layer at a time as they run",
    "cuda": "the same graph (opset-21 DequantizeLinear); not run on the CUDA provider yet: no "
            "GPU was available when this was built",
}


@dataclass
class QuantizeOptions:
    from_dir: Path
    precision: str | None = None  # a recipe (quant/plan.py RECIPES); None with stage_precision
    stage_precision: dict = field(default_factory=dict)  # {stage: format}, over the recipe
    block_size: int = 32  # int4 block (weights per scale), 32 | 64 | 128
    quality_target: float | None = None  # dB for every quantized stage; None: each format's
    measure_all: bool = False  # measure every group's sensitivity even when the target is met
    loras: tuple = ()  # fusion.fuse.LoraSpec, fused into the float weights first
    out: Path | None = None
    force: bool = False
    artifacts_root: Path = field(default_factory=lambda: Path("artifacts"))


def parse_quality_target(text) -> float | None:
    """'35dB', '35 dB' or '35' -> 35.0; None stays None."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    raw = str(text).strip()
    number = raw[:-2].strip() if raw.lower().endswith("db") else raw
    try:
        value = float(number)
    except ValueError:
        raise SdcError(f"--quality-target {raw}: expected a PSNR in dB such as 35dB") from None
    if not 0 < value < 200:
        raise SdcError(f"--quality-target {raw}: expected a PSNR between 0 and 200 dB, e.g. 35dB")
    return value


def from_build(opts: QuantizeOptions, log: Callable[[str], None] = print):
    """`sdc build --from`: quantize (or re-fuse LoRAs into) an existing build, without torch.
    A float build with only --lora is re-fused in place of its weights (fusion/refuse.py);
    formats, or a quantized source, come here."""
    base = mf.load_manifest(Path(opts.from_dir).absolute())
    if opts.precision is None and not opts.stage_precision and not is_quantized(base):
        from ..fusion.refuse import refuse

        return refuse(opts.from_dir, list(opts.loras), opts.out, force=opts.force,
                      artifacts_root=opts.artifacts_root, log=log)
    if opts.precision == base["precision"] and not opts.stage_precision and not opts.loras:
        raise SdcError(f"--from {opts.from_dir} is already {base['precision']}; nothing to do "
                       "(give --precision int8|int4 or --lora)")
    return quantize_build(opts, log)


def is_quantized(manifest: dict) -> bool:
    return bool(manifest.get("quantized_from"))


def _float_source(base: dict, opts: QuantizeOptions) -> tuple[QuantizeOptions, dict]:
    """From a quantized build only LoRAs may be asked: they go onto its recorded float source
    with the same recipe."""
    if opts.precision or opts.stage_precision:
        raise SdcError(f"--from {opts.from_dir} is already quantized ({base['precision']}); "
                       f"quantize its float source instead: --from {base['quantized_from']['path']}")
    if not opts.loras:
        raise SdcError(f"--from {opts.from_dir}: nothing asked; give --lora or --precision")
    if base.get("loras"):
        names = ", ".join(lo["name"] for lo in base["loras"])
        raise SdcError(f"{opts.from_dir} already has LoRA(s) fused ({names}); fusing again needs "
                       "the base weights: quantize a build made without --lora")
    src = base["quantized_from"]
    path = Path(src["path"])
    try:
        source = mf.load_manifest(path)
    except SdcError:
        source = None
    if source is None or source.get("build_key") != src["build_key"]:
        raise SdcError(f"{opts.from_dir} is quantized and its float source {path} is gone or was "
                       "rebuilt; LoRAs are fused into float weights before quantizing, so rebuild "
                       "the float build and quantize it with --lora")
    recipe = base["quantization"]
    return replace(opts, from_dir=path, precision=None, stage_precision=recipe["formats"],
                   block_size=recipe["block_size"], quality_target=recipe.get("quality_target")), \
        source


def quantize_build(opts: QuantizeOptions, log: Callable[[str], None] = print
                   ) -> tuple[Path, dict, bool]:
    """Returns (output folder, manifest, reused)."""
    from ..export.build import check_out
    from ..export.memory import process_peak_rss_bytes

    t0 = time.perf_counter()
    opts = replace(opts, from_dir=Path(opts.from_dir).absolute())
    base = mf.load_manifest(opts.from_dir)
    if is_quantized(base):
        opts, base = _float_source(base, opts)
        log(f"{base['base_model']['name']}: quantized build; fusing into its float source "
            f"{opts.from_dir}")
    problems = mf.verify_files(opts.from_dir, base, hashes=True)
    if problems:
        raise SdcError(f"--from {opts.from_dir}: {len(problems)} file(s) do not match its manifest "
                       f"({problems[0]}); rebuild it first")
    stages = list(base["graphs"])
    overrides = opts.stage_precision
    if isinstance(overrides, str) or overrides is None:
        overrides = qp.parse_stage_precision(overrides, stages)
    opts = replace(opts, stage_precision=overrides)
    roles = {s: base["family"]["roles"][s] for s in stages}
    formats = qp.stage_formats(opts.precision, overrides, roles)
    fm.check_block(opts.block_size)
    for stage in stages:
        src = base["graphs"][stage]["precision"]
        if src not in ("fp32", "fp16"):
            raise AssertionError(f"{stage}: float build with graph precision {src}")
        if formats[stage] == "fp32" and src == "fp16":
            raise SdcError(f"--stage-precision {stage}=fp32: {opts.from_dir}'s {stage} computes "
                           "fp16; fp32 needs an fp32 build to quantize from")
        if formats[stage] == static.FORMAT:
            static.check_source(stage, base["graphs"][stage], opts.from_dir)
    changed = [s for s in stages if formats[s] != base["graphs"][s]["precision"]]
    if not changed and not opts.loras:
        raise SdcError(f"--from {opts.from_dir} is already {', '.join(sorted(set(formats.values())))}"
                       " in every stage; nothing to quantize (give --precision int8|int4)")
    targets = {s: _target(formats[s], opts.quality_target) for s in stages}
    if opts.quality_target is not None and not any(fm.get(formats[s]).quantized for s in stages):
        raise SdcError("--quality-target applies to quantized stages; none is int8/int4")

    adapters, fused, lora_report = _fuse(opts, base)
    label = qp.label(formats, roles)
    names = "+".join([base["base_model"]["name"]] + [Path(s.path).stem for s in opts.loras])
    out = Path(opts.out or opts.artifacts_root / f"{names}-{label}").absolute()
    if out == opts.from_dir:
        raise SdcError("--out must differ from --from: the float build stays as it is")
    listed = check_out(out)
    key = hashlib.sha256(json.dumps({
        "base": base["build_key"], "formats": formats, "block": opts.block_size,
        "targets": targets, "measure_all": opts.measure_all, "quant": QUANT_VERSION,
        "sdc": __version__, "loras": [[lo.sha256, s.weight, s.blocks] for lo, s in adapters],
    }, sort_keys=True).encode()).hexdigest()
    if not opts.force:
        from ..export.build import reusable

        if old := reusable(out, key, log):
            log(f"up to date: {out} (build key {key[:12]}); --force rebuilds")
            return out, old, True

    from .calibrate import calibrate

    judged = [s for s in changed if targets[s] is not None] + \
        [s for s in stages if s not in changed and fused.get(s)]
    calib = calibrate(opts.from_dir, base, set(judged), opts.loras, log=log) if judged else None
    dims = dims_of(base["model"])
    with store.staging(out) as tmp:
        rewritten = {s for s in stages if s in changed or fused.get(s)}
        for rel in base["files"]:
            if rel.split("/", 1)[0] in rewritten and not rel.endswith("/config.json"):
                continue
            src, dst = mf.contained(opts.from_dir, rel, "manifest files entry"), tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        graphs = copy.deepcopy(base["graphs"])
        for stage in stages:
            if stage not in rewritten:
                continue
            feeds = calib.feeds.get(stage, []) if calib else []
            before = set((tmp / stage).rglob("*"))
            try:
                graphs[stage] = _quantize_stage(stage, base, opts, formats[stage],
                                                targets[stage], fused.get(stage, {}), feeds,
                                                dims, tmp, log)
            except ParityError as e:
                alt = qp.fallback(opts.precision, roles[stage], overrides, stage)
                if alt is None:
                    raise
                log(f"[{stage}] {formats[stage]} refused by its gate ({e}); falling back to "
                    f"{alt}, as the {opts.precision} recipe allows")
                for p in sorted(set((tmp / stage).rglob("*")) - before, reverse=True):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                refused = {"format": formats[stage], "target_db": targets[stage],
                           "why": str(e)}
                formats[stage], targets[stage] = alt, _target(alt, opts.quality_target)
                graphs[stage] = _quantize_stage(stage, base, opts, alt, targets[stage],
                                                fused.get(stage, {}), feeds, dims, tmp, log)
                graphs[stage].setdefault("quantization", {})["fallback"] = refused
        label = qp.label(formats, roles)
        files = dict(mf.file_entry(tmp, p) for p in sorted(tmp.rglob("*")) if p.is_file())
        for stage in rewritten:
            graphs[stage]["files"] = sorted(r for r in files if r.startswith(f"{stage}/") and
                                            _graph_file(r, stage, graphs[stage]))
        from ..export.profile import profile_build

        memory_profile = profile_build(tmp, graphs, base["model"], base["family"], log)
        manifest = copy.deepcopy(base)
        manifest.update(
            build_key=key, precision=label, graphs=graphs, memory_profile=memory_profile,
            files=files, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            quantized_from={"path": str(opts.from_dir), "build_key": base["build_key"],
                            "precision": base["precision"]},
            quantization={"formats": formats, "block_size": opts.block_size,
                          "quality_target": opts.quality_target, "targets": targets,
                          "calibration": calib.describe() if calib else None,
                          "execution": EXECUTION, "version": QUANT_VERSION},
            loras=list(base.get("loras", [])) + [{**r, "applied": "before quantization"}
                                                  for r in lora_report],
            build={"seconds": round(time.perf_counter() - t0, 2),
                   "peak_rss_bytes": process_peak_rss_bytes()})
        manifest["versions"] = {**base.get("versions", {}), "sdc": __version__}
        mf.write_manifest(tmp, manifest)
        denoiser = of_manifest(base).one("denoise")
        if calib is not None and denoiser in rewritten and set(base["pipeline"]) <= set(stages):
            manifest["quantization"]["images"] = _image_gate(calib, tmp, base, formats, targets,
                                                             log)
            mf.write_manifest(tmp, manifest)
        store.commit(tmp, out, listed)
    total = sum(e["bytes"] for e in files.values())
    log(f"wrote {out} in {manifest['build']['seconds']:.1f} s ({label}, {total / 2**20:.1f} MiB; "
        f"float source {sum(e['bytes'] for e in base['files'].values()) / 2**20:.1f} MiB, no torch)")
    return out, manifest, False


# The end-to-end gate on the built-in model's images, by the lowest format in the build: 30 dB is
# the bar an int8 build must clear (issue 14's quality targets); 4-bit drift is larger and judged
# by `sdc eval`'s adherence, so its gate only has to catch a broken build: two *unrelated* sdc-tiny
# images (different prompts) measure 7.9-14.9 dB against each other (the calibration prompts,
# measured), a correct 4-bit build 20 dB and up. w8a8 (8-bit activations too) drifts like 4-bit
# on sdc-tiny: 23.6-29.9 dB over the four calibration prompts (measured; the two off-vocabulary
# prompts lowest), so its gate is the broken-build bar with the same margin over unrelated images.
IMAGE_GATE_DB = {"int8": 30.0, "w8a8": 20.0, "int4": 18.0}


def _image_gate(calib, tmp: Path, base: dict, formats: dict, targets: dict, log) -> dict:
    """The calibration prompts through the new build against the float build's images (LoRAs
    included): recorded for every build, a hard gate for the built-in sdc-tiny, whose trained
    weights make images a meaningful check (random full-size weights make noise)."""
    from .calibrate import image_psnr

    values = image_psnr(calib, tmp)
    floor = min([IMAGE_GATE_DB[formats[s]] for s in formats if fm.get(formats[s]).quantized]
                or [fm.FORMATS["fp16"].default_target_db])
    gated = bool(base["base_model"].get("builtin"))
    worst = min(values)
    log(f"images: {len(values)} calibration prompts vs the float build: worst {worst:.2f} dB"
        + (f" >= {floor:g}: passed" if gated else " (recorded; gated for the built-in model)"))
    if gated and worst < floor:
        raise ParityError(f"the quantized build's images differ from the float build's: "
                          f"{worst:.2f} dB PSNR, required >= {floor:g} dB for the built-in model; "
                          "raise --quality-target or keep more stages in 16 bits")
    return {"psnr_db": [round(v, 2) for v in values], "worst_db": worst,
            "threshold_db": floor if gated else None, "gated": gated,
            "what": "8-bit images of the calibration prompts vs the float build, same seeds"}


def _graph_file(rel: str, stage: str, graph: dict) -> bool:
    """A file of the stage's whole graph (not a tiling segment, a chunk or the folder config)."""
    others = set(graph.get("tiled", {}).get("files", [])) | set(graph.get("chunks", {}).get(
        "files", [])) | {f"{stage}/config.json"}
    return rel not in others and not rel.startswith(f"{stage}/tiled/")


def _target(fmt: str, asked: float | None) -> float | None:
    f = fm.get(fmt)
    if f.quantized and asked is not None:
        return float(asked)
    return f.default_target_db


def _fuse(opts: QuantizeOptions, base: dict):
    if not opts.loras:
        return [], {}, []
    from ..fusion.artifact import fused_initializers, known_modules, load_adapters
    from ..fusion.fuse import plan, report

    adapters = load_adapters(list(opts.loras), known_modules(base))
    fused, max_delta = fused_initializers(opts.from_dir, base, plan(adapters))
    return adapters, fused, report(adapters, max_delta)


def _quantize_stage(stage: str, base: dict, opts: QuantizeOptions, stage_fmt: str,
                    target: float | None, fused: dict, feeds: list[dict], dims,
                    tmp: Path, log) -> dict:
    import onnx

    from .graph import WeightReader, find_sites, rewrite
    from .search import Judge, judge_copy, search

    if stage_fmt == static.FORMAT:
        return _quantize_stage_w8a8(stage, base, opts, target, fused, feeds, dims, tmp, log)
    t0 = time.perf_counter()
    graph = copy.deepcopy(base["graphs"][stage])
    src = opts.from_dir / next(f for f in graph["files"] if f.endswith(".onnx"))
    (tmp / stage).mkdir(parents=True, exist_ok=True)
    proto = onnx.load(str(src), load_external_data=False)
    sites = find_sites(proto)
    reader = WeightReader(src.parent, proto)
    del proto
    param_of = {init: p for p, init in (graph.get("weights") or {}).get("map", {}).items()}
    src_dtype = "float16" if graph["precision"] == "fp16" else "float32"
    plan, kept = {}, {}
    for init, site in sites.items():
        path = param_of.get(init, init)
        fmt, why = qp.weight_format(stage_fmt, path, site.kind)
        if fmt == "fp16" and src_dtype == "float16":
            fmt = "fp32"  # already half: nothing to change
        if why:
            kept[path] = why
        plan[init] = fmt
    encoded = {}
    for init, fmt in plan.items():
        if fmt == "fp32":
            continue
        site = sites[init]
        w = fused.get(init)
        w = reader.read(init) if w is None else w
        encoded[init] = fm.get(fmt).encode(
            site.stored(w), site.reduce_axis if fmt == "int4" else site.channel_axis,
            opts.block_size)
    log(f"[{stage}] {stage_fmt}: {len(encoded)} of {len(plan)} weights encoded "
        f"({time.perf_counter() - t0:.1f} s), {len(kept)} kept in 16 bits")
    from ..export.parity import parity_cases

    # Judged on every input the gate checks: the trajectories and the spec's parity cases. The
    # reference (the float graph, LoRAs fused) is computed once; the quantized graph is written
    # and measured for real first, and only a graph that misses its target is searched.
    cases = parity_cases(of_manifest(base).spec(stage), dims)
    inputs = [(f"calibration {i}", f) for i, f in enumerate(feeds)] + list(cases.items())
    reference = _run(src, [f for _, f in inputs], fused)
    dst = tmp / stage / "model.onnx"

    def write(plan):
        cache = {i: e for i, e in encoded.items() if plan[i] == e.fmt}
        return rewrite(src, dst, lambda site: (plan[site.init], opts.block_size),
                       overrides=fused, data_file=DATA_FILE, encoded_cache=cache)

    layers = write(plan)
    outs = _run(dst, [f for _, f in inputs])
    achieved = achieved_all = min(fm.psnr(r, o) for r, o in zip(reference, outs))
    searchable = fm.get(stage_fmt).quantized and target is not None
    if searchable:
        log(f"[{stage}] every weight in its format: {achieved:.2f} dB (target {target:g} dB)")
    result = None
    if searchable and (achieved < target or opts.measure_all):
        work = tmp / f".judge-{stage}"
        try:
            judge = Judge(judge_copy(src, work), [f for _, f in inputs], fused, reference)
            weights = {i: {"format": plan[i], "group": qp.group_of(param_of.get(i, i)),
                           "decoded": lambda i=i: sites[i].unstored(
                               fm.get(plan[i]).decode(encoded[i])),
                           "fp16": lambda i=i: _half(_float(fused, reader, i))}
                       for i in encoded}
            result = search(judge, weights, target, opts.measure_all, log, stage, achieved)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if result.restored:
            plan.update(result.formats)
            layers = write(plan)
            outs = _run(dst, [f for _, f in inputs])
    parity = _gate(stage, inputs, reference, outs, target)
    floats = sum(l["bytes"] for l in layers.values() if l["format"] == "fp32")
    log(f"[{stage}] gate psnr {parity['value']:.2f} dB >= {parity['threshold']:g} over "
        f"{len(parity['cases'])} inputs: passed")
    graph.pop("weights", None)  # quantized weights are not LoRA targets (see fusion/artifact.py)
    graph.update(precision=stage_fmt, opset=qp_opset(tmp / stage / "model.onnx"),
                 precision_reason=_reason(stage_fmt, graph["precision"]), parity=parity)
    graph["quantization"] = {
        "format": stage_fmt, "block_size": opts.block_size if stage_fmt == "int4" else None,
        "target_db": target, "achieved_db": parity["value"],
        "search": None if result is None else {
            "all_quantized_db": round(achieved_all, 2), "evaluations": result.evaluations,
            "kept_fp16_groups": result.restored,
            "sensitivity_db": {g: round(v, 2) for g, v in sorted(result.sensitivities.items())}},
        "kept": kept,
        "layers": {param_of.get(i, i): {**l, "group": qp.group_of(param_of.get(i, i))}
                   for i, l in sorted(layers.items())},
        "weight_bytes": sum(l["bytes"] for l in layers.values()), "unchanged_float_bytes": floats,
    }
    if graph.get("tiled"):
        _quantize_tiled(stage, graph, base, opts, plan, fused, tmp, dims, log, encoded)
    encoded.clear()
    if graph.get("chunks"):
        _recut_chunks(of_manifest(base).spec(stage), graph, tmp, dims, log)
    log(f"[{stage}] {stage_fmt} written in {time.perf_counter() - t0:.1f} s")
    return graph


def _quantize_stage_w8a8(stage: str, base: dict, opts: QuantizeOptions, target: float | None,
                         fused: dict, feeds: list[dict], dims, tmp: Path, log) -> dict:
    """A w8a8 graph (quant/static.py): activation scales calibrated on the trajectories, then
    gated like every quantized graph on those inputs and the spec's parity cases, measured at
    the optimisation level the runtime opens it at. No layer search: a graph that misses its
    target is refused (int8 keeps float arithmetic and meets it)."""
    import onnx

    from ..export.parity import parity_cases

    t0 = time.perf_counter()
    graph = copy.deepcopy(base["graphs"][stage])
    src = opts.from_dir / next(f for f in graph["files"] if f.endswith(".onnx"))
    (tmp / stage).mkdir(parents=True, exist_ok=True)
    param_of = {init: p for p, init in (graph.get("weights") or {}).get("map", {}).items()}
    proto = onnx.load(str(src), load_external_data=False)
    exclude = static.kept_nodes(proto, param_of)
    del proto
    cases = parity_cases(of_manifest(base).spec(stage), dims)
    inputs = [(f"calibration {i}", f) for i, f in enumerate(feeds)] + list(cases.items())
    reference = _run(src, [f for _, f in inputs], fused)
    dst = tmp / stage / "model.onnx"
    info = static.quantize(src, dst, feeds, exclude, fused, tmp / f".w8a8-{stage}", log)
    counts, layers = static.describe(dst, param_of)
    info.update(counts)
    log(f"[{stage}] {counts['quantized_nodes']} convs/linears on 8-bit activations, "
        f"{counts['float_nodes']} left float")
    outs = _run(dst, [f for _, f in inputs], level=static.OPTIMIZATION)
    parity = _gate(stage, inputs, reference, outs, target)
    log(f"[{stage}] gate psnr {parity['value']:.2f} dB >= {parity['threshold']:g} over "
        f"{len(parity['cases'])} inputs: passed")
    graph.pop("weights", None)  # quantized weights are not LoRA targets (see fusion/artifact.py)
    # the exact tiling segments are cut from the float graph: each would need its own activation
    # calibration, so a w8a8 decoder has none (tiles are blended: runtime/vae_decode.py)
    dropped = graph.pop("tiled", None)
    graph.update(precision=static.FORMAT, opset=qp_opset(dst), optimization=static.OPTIMIZATION,
                 precision_reason=_reason(static.FORMAT, graph["precision"]), parity=parity)
    graph["quantization"] = {
        "format": static.FORMAT, "block_size": None, "target_db": target,
        "achieved_db": parity["value"], "search": None, "kept": {}, "static": info,
        "layers": {k: {**v, "group": qp.group_of(k)} for k, v in sorted(layers.items())},
        "weight_bytes": sum(v["bytes"] for v in layers.values()),
        "unchanged_float_bytes": sum(v["bytes"] for v in layers.values() if v["format"] == "fp32"),
    }
    if dropped:
        graph["quantization"]["exact_tiles"] = (
            f"not kept: the float build's {len(dropped['segments'])} tiling segments would each "
            "need their own activation calibration; a tiled decode blends whole-graph tiles")
    log(f"[{stage}] w8a8 written in {time.perf_counter() - t0:.1f} s")
    return graph


def qp_opset(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _reason(fmt: str, source: str) -> str:
    if fmt == "fp16":
        return f"fp16 weights computed in {'fp32' if source == 'fp32' else 'fp16'} (quantized build)"
    return f"{fmt} weights ({fm.get(fmt).description}), quantized from the {source} build"


def _run(path: Path, feeds: list[dict], overrides: dict | None = None,
         level: str = "basic") -> list[np.ndarray]:
    from .search import run_graph

    return run_graph(path, feeds, overrides, level)


def _half(w: np.ndarray) -> np.ndarray:
    """w rounded to fp16, in its own type (what an fp16-kept layer computes with)."""
    return w.astype(np.float16).astype(w.dtype)


def _float(fused: dict, reader, init: str) -> np.ndarray:
    w = fused.get(init)
    return reader.read(init) if w is None else w


def _gate(stage: str, inputs: list, reference: list, outs: list, target: float | None) -> dict:
    """The quantized graph against the float one (LoRAs fused) on the calibration inputs and the
    spec's parity cases: every input must meet the stage's target."""
    threshold = target if target is not None else fm.FORMATS["fp16"].default_target_db
    results = []
    for (name, f), r, o in zip(inputs, reference, outs):
        finite = bool(np.isfinite(o).all())
        value = fm.psnr(r, o) if finite else None
        results.append({"case": name, "input_shapes": {k: list(v.shape) for k, v in f.items()},
                        "value": value, "passed": finite and value >= threshold})
    worst = min((r["value"] for r in results if r["value"] is not None), default=None)
    report = {"metric": "psnr_db", "threshold": threshold, "value": worst,
              "reference": "the float build's graph (gated against torch fp32 at max_rel 1e-4)",
              "passed": all(r["passed"] for r in results), "cases": results}
    if not report["passed"]:
        bad = next(r for r in results if not r["passed"])
        shown = "non-finite output" if bad["value"] is None else f"{bad['value']:.2f} dB"
        raise ParityError(f"parity failed for the quantized {stage} ({bad['case']}): {shown}, "
                          f"required psnr_db >= {threshold:g}; the build was not written")
    return report


TILED_PREFIX = "tiled-"  # quantized builds: vae_decoder/tiled-<segment>.onnx


def _quantize_tiled(stage: str, graph: dict, base: dict, opts: QuantizeOptions, plan: dict,
                    fused: dict, tmp: Path, dims, log, encoded: dict) -> None:
    """The decoder's tiling segments get the whole graph's formats weight for weight (matched by
    content: a segment's initializer holds the same bytes as the whole graph's), then the tiled
    decode is gated against the quantized whole graph as the float build gated it (max_rel)."""
    import onnx

    from ..export.parity import check_tiled_decoder, parity_cases
    from .graph import WeightReader, rewrite

    src_main = opts.from_dir / next(f for f in base["graphs"][stage]["files"] if f.endswith(".onnx"))
    proto = onnx.load(str(src_main), load_external_data=False)
    reader = WeightReader(src_main.parent, proto)
    by_digest = {}
    for init in plan:
        by_digest[hashlib.sha256(reader.read(init).tobytes()).hexdigest()] = init
    del proto
    tiled = graph["tiled"]
    from .graph import written_tensors

    whole_tensors = written_tensors(tmp / stage / "model.onnx")
    segments, files = [], []
    for seg in tiled["segments"]:
        src = mf.contained(opts.from_dir, seg["file"], "tiled segment")
        # beside the whole graph, so its weights point into the whole graph's data file: the
        # float build's segments carry their own copy (0.1 GB of SD1.5's decoder); these don't
        rel = f"{stage}/{TILED_PREFIX}{Path(seg['file']).name}"
        sp = onnx.load(str(src), load_external_data=False)
        sr = WeightReader(src.parent, sp)
        local = {}
        for t in sp.graph.initializer:
            whole = by_digest.get(hashlib.sha256(sr.read(t.name).tobytes()).hexdigest())
            if whole is not None:
                local[t.name] = whole
        del sp
        rewrite(src, tmp / rel, lambda site: (plan.get(local.get(site.init), "fp32"),
                                              opts.block_size),
                overrides={n: fused[w] for n, w in local.items() if w in fused}, data_file=None,
                encoded_cache={i: e for i, e in encoded.items() if plan[i] == e.fmt},
                shared=(whole_tensors, {n: w for n, w in local.items()
                                                               if plan.get(w, "fp32") != "fp32"}))
        segments.append({**seg, "file": rel})
        files.append(rel)
    tiled.update(segments=segments, files=sorted(files),
                 description=tiled.get("description", "") + " Quantized: the segments sit beside "
                 "the whole graph and share its data file.")
    spec = of_manifest(base).spec(stage)
    cases = parity_cases(spec, dims)
    main = tmp / stage / "model.onnx"
    refs = dict(zip(cases, _run(main, list(cases.values()))))
    tile = dims.unet_multiple
    tiled["parity"] = check_tiled_decoder(tmp, tiled["segments"], spec, cases, refs, tile)
    tiled["parity"]["reference"] = "the quantized whole decoder graph"
    log(f"[{stage}] {len(tiled['segments'])} tiling segments rewritten; tiled parity max_rel "
        f"{tiled['parity']['value']:.3g}: passed")


def _recut_chunks(spec, graph: dict, tmp: Path, dims, log) -> None:
    """The quantized UNet cut again into as many chunks as the float build had; each chunk and
    the chain gated against the quantized whole graph (its own gate is against the float)."""
    from ..export.parity import check_unet_chunks, parity_cases
    from ..export.unet_chunks import split_graph

    stage = spec.stage
    n = len(graph["chunks"]["parts"])
    parts = split_graph(tmp / stage / "model.onnx", n, tmp / stage)
    cases = parity_cases(spec, dims)
    refs = dict(zip(cases, _run(tmp / stage / "model.onnx", list(cases.values()))))
    report = check_unet_chunks(tmp / stage, parts, spec, "fp32", cases, refs)
    report["reference"] = "the quantized whole UNet graph"
    graph["chunks"] = {**graph["chunks"], "parts": parts, "parity": report,
                       "files": sorted(f"{stage}/{p['file']}" for p in parts)}
    log(f"[{stage}] re-cut into {n} chunks of " + ", ".join(
        f"{p['weight_bytes'] / 2**20:.0f}" for p in parts) + " MiB; chunk parity passed")
