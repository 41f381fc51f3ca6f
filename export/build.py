"""`sdc build`: model -> per-stage ONNX graphs + manifest, gated by parity, written atomically.

Flow per component of the model's family (families/; SD1: text_encoder, unet, vae -> vae_decoder +
vae_encoder; SDXL adds text_encoder_2):
  load fp32 -> torch references on the parity cases -> cast (fp16 policy) -> export -> free the
  torch module -> run the ONNX graph in ORT against the references (hard fail).
Only one component's torch weights are alive at a time and no torch module is alive while ORT
runs, which bounds build memory by the biggest component (the UNet), not the sum.

Output is written into a private staging directory beside the output (runtime/store.py), the
manifest last, and swapped onto the output directory only after every graph passed: an interrupted
or failed build never leaves a directory with a manifest, a previous good build at the same path
survives a failed rebuild, and a directory holding files sdc did not write is never replaced.
Builds are cached by content key (model weights' hashes, options, versions): same key -> reuse.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import SdcError
from ..runtime import manifest as mf
from ..runtime import store
from .memory import process_peak_rss_bytes
from ..families import Family, ModelDims

PRECISIONS = ("fp16", "fp32")  # what torch exports; int8/int4 are quantized from fp32 (quant/)
# What a build writes; part of the build key so a cached build of an older layout is rebuilt.
# 2: vae_decoder/tiled/ segments. 3: weights.data (external-data offsets for torch-free LoRA paths).
# 4: each model folder holds its source component's config.json (what Optimum's pipeline reads) and
# model_index.json names the build's real scheduler class. 5: adapter slots in the UNet and text
# encoder graphs (export/adapter_slots.py), listed in graphs.<stage>.weights.slots. 6: the manifest's
# `family` block (families/): the stages' roles, the text encoders, the UNet's conditioning.
BUILD_LAYOUT = 6
TILED_DIR = "tiled"  # vae_decoder/tiled/: the decoder's segments for exact tiled decoding


@dataclass
class BuildOptions:
    model: str | None = None  # path; None = the built-in model
    precision: str = "fp16"  # fp16 (GPU target) | fp32 (CPU target)
    out: Path | None = None  # default: artifacts/<model name>-<precision>
    force: bool = False  # rebuild even when the build key matches
    config: str | None = None  # component configs for non-standard single-file checkpoints
    upscaler: str | None = None  # DeepFloyd IF: the stage II (IF-II) folder, built as unet_2
    stages: tuple[str, ...] | None = None  # None: every stage of the model's family
    artifacts_root: Path = field(default_factory=lambda: Path("artifacts"))
    cancel: threading.Event | None = None  # set by the CLI's signal handler: stop at next step
    loras: tuple = ()  # fusion.fuse.LoraSpec: adapters fused into the weights before export
    embeddings: tuple = ()  # (path, token or None): textual-inversion tokens added at build
    unet_chunks: int = 0  # >= 2: also cut the UNet into this many sub-graphs (export/unet_chunks.py)
    # Quantized builds (quant/): a float build first (kept at its own default path, the
    # quantized build's recorded source), then the torch-free pass over it.
    stage_precision: str | dict | None = None  # "unet=int4,..." over the precision's recipe
    block_size: int = 32  # int4 weights per block
    quality_target: float | None = None  # dB; None: each format's default
    measure_all: bool = False  # measure every layer group's sensitivity


def _check_cancel(opts: BuildOptions) -> None:
    if opts.cancel is not None and opts.cancel.is_set():
        raise KeyboardInterrupt


@dataclass
class BuildResult:
    out: Path
    manifest: dict
    reused: bool


def _versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    return {"sdc": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def build_key(source_hash: str, opts: BuildOptions, versions: dict, loras: list | None = None,
              embeddings: list | None = None) -> str:
    """Content key: what the graphs depend on (adapters by content hash, weight and blocks)."""
    from .exporter import OPSET

    payload = {"layout": BUILD_LAYOUT, "source": source_hash, "precision": opts.precision,
               # None only before the family resolves it (_check_stages): every stage
               "stages": list(opts.stages) if opts.stages is not None else "all", "opset": OPSET,
               "loras": [[lo["sha256"], lo["weight"], lo["blocks"]] for lo in loras or []],
               "embeddings": [[e["sha256"], e["token"]] for e in embeddings or []],
               "versions": {k: versions[k] for k in ("sdc", "torch", "onnx", "onnxscript")}}
    if opts.unet_chunks:  # only when asked, so the keys of builds without chunks stay as they were
        payload["unet_chunks"] = opts.unet_chunks
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def check_out(out: Path) -> list[str]:
    """Refuse outputs we must not overwrite, before spending minutes exporting. Returns the files
    the existing build at `out` lists (what a swap may replace), [] for a new directory."""
    if out.is_symlink():
        raise SdcError(f"--out {out} is a symlink; give the real directory path (sdc replaces the "
                       "directory it names, and will not follow a link to somewhere else)")
    if out.exists() and not out.is_dir():
        raise SdcError(f"--out {out} is a file; expected a directory path for the build")
    listed: list[str] = []
    if out.is_dir() and any(out.iterdir()):
        if not mf.is_sdc_build(out):
            raise SdcError(f"--out {out} holds files that are not an sdc build; choose an empty or "
                           "new directory (sdc only replaces its own builds)")
        try:
            listed = list(mf.load_manifest(out, any_layout=True)["files"])
        except SdcError:
            listed = []  # unreadable manifest: everything but manifest.json counts as foreign
        store.refuse_foreign(out, listed)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SdcError(f"--out {out}: cannot create parent directory ({e.strerror}); choose a "
                       "writable location") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SdcError(f"--out {out}: {parent} is not writable; choose a writable location")
    return listed


def reusable(out: Path, key: str, log: Callable[[str], None]) -> dict | None:
    """The build at `out` when its key matches and every file still hashes to its manifest entry
    ("up to date" is never taken on trust: a tampered build is rebuilt, and says so)."""
    if not mf.is_sdc_build(out):
        return None
    try:
        manifest = mf.load_manifest(out)
    except SdcError:
        return None
    if manifest.get("build_key") != key:
        return None
    problems = mf.verify_files(out, manifest, hashes=True)
    if problems:
        log(f"{out}: same build key but {len(problems)} file(s) no longer match its manifest "
            f"({problems[0]}); rebuilding")
        return None
    return manifest


def _build_component(source, component: str, stages: list[str], precision: str, dims: ModelDims,
                     tmp: Path, log: Callable[[str], None], fusion=None, unet_chunks: int = 0) -> dict:
    family: Family = source.spec
    import torch

    from .exporter import export_graph, wrap
    from .parity import check_graph, parity_cases, torch_references

    t0 = time.perf_counter()
    module = _load(source, component, "fp32")
    log(f"[{component}] loaded fp32 ({sum(p.numel() for p in module.parameters()) / 1e6:.2f} M "
        f"params, {time.perf_counter() - t0:.1f} s)")
    if fusion is not None and (n := fusion.apply(module, component)):
        log(f"[{component}] fused LoRA into {n} weights")
    plans = {}
    for stage in stages:
        spec = family.spec(stage)
        feeds = parity_cases(spec, dims)
        refs = torch_references(wrap(spec, module), spec, feeds)
        graph_precision = "fp32" if precision == "fp32" or spec.fp16_policy == "fp32" else "fp16"
        plans[stage] = (spec, feeds, refs, graph_precision)
    results = {}
    for stage, (spec, feeds, refs, graph_precision) in plans.items():
        if graph_precision == "fp16" and module.dtype != torch.float16:
            # Reload in fp16 (the references are computed) rather than `.half()`: loading with a
            # dtype honours a model's modules that must stay fp32, which a blanket cast breaks.
            del module
            gc.collect()
            module = _load(source, component, "fp16")
            if fusion is not None:
                fusion.apply(module, component)
        elif graph_precision == "fp32" and module.dtype == torch.float16:
            raise AssertionError("fp32 graphs of a component must be exported before fp16 ones")
        t0 = time.perf_counter()
        facts = export_graph(spec, wrap(spec, module), dims, tmp / stage)
        if spec.adapter_slots:
            from .adapter_slots import add_adapter_slots

            slots = add_adapter_slots(tmp / stage / "model.onnx")
            facts["weights"]["slots"] = [s for s in slots if s in facts["weights"]["data"]]
        log(f"[{stage}] exported {graph_precision} ({time.perf_counter() - t0:.1f} s)"
            + (f", {len(facts['weights']['slots'])} adapter slots" if spec.adapter_slots else ""))
        results[stage] = {"graph_precision": graph_precision, **facts}
        if spec.role == "decode":
            results[stage]["tiled"] = _export_tiled_decoder(module, spec, dims, tmp / stage, log)
        if spec.role == "denoise" and unet_chunks:
            from .unet_chunks import split_graph

            parts = split_graph(tmp / stage / "model.onnx", unet_chunks, tmp / stage)
            results[stage]["chunks"] = {"parts": parts}
            log(f"[{stage}] cut into {len(parts)} chunks of " + ", ".join(
                f"{p['weight_bytes'] / 2**20:.0f}" for p in parts) + " MiB of weights")
    # Free the torch weights before ORT loads the graphs: the two never coexist in memory.
    del module
    gc.collect()
    for stage, (spec, feeds, refs, graph_precision) in plans.items():
        report, memory = check_graph(spec, tmp / stage / "model.onnx", graph_precision, feeds, refs)
        op = "<=" if report["metric"] == "max_rel" else ">="
        log(f"[{stage}] parity {report['metric']} {report['value']:.3g} {op} {report['threshold']} "
            f"over {len(report['cases'])} shapes: passed")
        results[stage].update(parity=report, memory=memory)
        if results[stage].get("tiled"):
            _check_tiled_decoder(results[stage]["tiled"], spec, dims, feeds, refs, tmp / stage, log)
        if results[stage].get("chunks"):
            _check_chunks(results[stage]["chunks"], spec, graph_precision, feeds, refs,
                          tmp / stage, log)
    return results


# The parity gate's tile: cuts the square case (4 x unet_multiple latents) into 4 x 4 tiles and
# the non-square one into 3 x 5, so every halo and seam is exercised at every level.
def _parity_tile(dims: ModelDims) -> int:
    return dims.unet_multiple


def _export_tiled_decoder(vae, spec, dims: ModelDims, stage_dir: Path, log) -> dict | None:
    """The decoder cut at its GroupNorms for exact tiling (export/vae_segments.py); None, with a
    log line, for a decoder whose structure the cut does not know (then the runtime falls back to
    blended tiles of the whole graph)."""
    import torch

    from .vae_segments import UnsupportedDecoder, export_segments

    t0 = time.perf_counter()
    trace = spec.dummy_inputs(dims, spec.case_dims(dims)["trace"])["latent_sample"]
    try:
        segments = export_segments(vae, torch.from_numpy(trace), stage_dir / TILED_DIR)
    except UnsupportedDecoder as e:
        log(f"[vae_decoder] no exact tiled decoder ({e}); tiled decodes will blend whole-graph tiles")
        return None
    log(f"[vae_decoder] exported {len(segments)} segments for exact tiling "
        f"({time.perf_counter() - t0:.1f} s)")
    return {"dir": TILED_DIR, "segments": segments}


def _check_tiled_decoder(tiled: dict, spec, dims: ModelDims, feeds: dict, refs: dict,
                         stage_dir: Path, log) -> None:
    from .parity import check_tiled_decoder

    tile = _parity_tile(dims)
    tiled["parity"] = check_tiled_decoder(stage_dir / tiled["dir"], tiled["segments"], spec, feeds,
                                          refs, tile)
    log(f"[vae_decoder] tiled parity max_rel {tiled['parity']['value']:.3g} <= "
        f"{spec.fp32_max_rel} at {tile}-latent tiles: passed")


def _check_chunks(chunks: dict, spec, graph_precision: str, feeds: dict, refs: dict,
                  stage_dir: Path, log) -> None:
    from .parity import check_unet_chunks

    chunks["parity"] = report = check_unet_chunks(stage_dir, chunks["parts"], spec,
                                                  graph_precision, feeds, refs)
    worst = max(c["max_rel"] for c in report["chunks"])
    op = "<=" if report["metric"] == "max_rel" else ">="
    log(f"[unet] chunk parity max_rel {worst:.3g} <= {report['chunks'][0]['threshold']} against "
        f"the whole graph; chained {report['metric']} {report['value']:.3g} {op} "
        f"{report['threshold']}: passed")


def _load(source, component: str, dtype: str):
    """The component's torch module; a failure inside diffusers/transformers becomes one line."""
    from .quiet import quiet_torch_stack

    try:
        with quiet_torch_stack():
            return source.load(component, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if "ignore_mismatched_sizes" in first:  # transformers' hint points at a silenced table
            first = f"weight shapes do not match {component}/config.json"
        raise SdcError(f"{source.path}: cannot load its {component} ({first}); check the model "
                       "files, or pass --config for a non-standard single-file checkpoint") from None


def _graph_entry(spec, result: dict, dims: ModelDims, tmp: Path, files: dict) -> dict:
    from .exporter import OPSET, numpy_dtype
    import onnx

    stage = spec.stage
    tiled_prefix = f"{stage}/{TILED_DIR}/"
    chunk_files = {f"{stage}/{p['file']}" for p in result.get("chunks", {}).get("parts", [])}
    proto = onnx.load(str(tmp / stage / "model.onnx"), load_external_data=False)
    declared = {i.name: numpy_dtype(i.type.tensor_type.elem_type)
                for i in list(proto.graph.input) + list(proto.graph.output)}
    io = {}
    for kind, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        io[kind] = []
        for t in tensors:
            entry = t.resolve(dims)
            if declared.get(t.name) != t.dtype:
                raise AssertionError(f"{stage}.{t.name}: graph dtype {declared.get(t.name)} != spec")
            io[kind].append(entry)
    precision = result["graph_precision"]
    reason = ("fp32 build" if precision == "fp32" and spec.fp16_policy != "fp32" else
              "kept fp32: the SD VAE overflows fp16 (NaN/black images) on some latents"
              if spec.fp16_policy == "fp32" else "fp16 build")
    return {
        "description": spec.description,
        # the graph's own files; the folder's config.json (for Optimum) is in the files table only
        "files": sorted(rel for rel in files if rel.startswith(f"{stage}/")
                        and not rel.startswith(tiled_prefix) and rel not in chunk_files
                        and rel != f"{stage}/config.json"),
        "opset": OPSET,
        "precision": precision,
        "precision_reason": reason,
        **io,
        "latent_multiple": int(getattr(dims, spec.multiple)) if spec.role in ("denoise", "upscale")
        else 1,
        "parity": result["parity"],
        "memory": result["memory"],
        "weights": result["weights"],
        "attention": "fused MultiHeadAttention" if spec.fused_attention else "MatMul-Softmax-MatMul",
        **({"tiled": _tiled_entry(result["tiled"], tiled_prefix, files)}
           if result.get("tiled") else {}),
        **({"chunks": {
            "description": "the UNet cut into sequential sub-graphs sharing model.onnx_data; "
                           "the runtime streams them under a memory budget (export/unet_chunks.py)",
            "files": sorted(chunk_files), **result["chunks"]}} if result.get("chunks") else {}),
    }


def _tiled_entry(tiled: dict, prefix: str, files: dict) -> dict:
    return {
        "description": "the decoder cut at its GroupNorms: the runtime decodes tile by tile with "
                       "whole-image statistics, exactly (see sdc/export/vae_segments.py)",
        "files": sorted(rel for rel in files if rel.startswith(prefix)),
        "segments": [{**seg, "file": prefix + seg["file"]} for seg in tiled["segments"]],
        "parity": tiled["parity"],
    }


def _copy_tokenizers(source, tmp: Path, embeddings: list | None = None) -> None:
    """Each text encoder's tokenizer folder, as the runtime's `tokenizers` library reads it."""
    for encoder in source.spec.text_encoders:
        tok = tmp / encoder.tokenizer
        tok.mkdir()
        src = source.tokenizer_dir(encoder.tokenizer)
        for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "LICENSE"):
            if (src / name).is_file():
                shutil.copy2(src / name, tok / name)
        if not (tok / "tokenizer.json").is_file() and encoder.kind == "t5":
            _t5_tokenizer_json(src, tok)
        elif not (tok / "tokenizer.json").is_file():
            # Older SD folders ship only vocab.json + merges.txt; the runtime's `tokenizers`
            # library reads tokenizer.json, which transformers' CLIP tokenizer writes from those.
            from transformers import CLIPTokenizer

            CLIPTokenizer.from_pretrained(str(src)).save_pretrained(str(tok))
        if embeddings:
            from ..fusion.torch_apply import add_tokens

            add_tokens(tok, embeddings, encoder.stage)


def _t5_tokenizer_json(src: Path, tok: Path) -> None:
    """IF downloads ship T5's sentencepiece model (spiece.model); the runtime reads the
    `tokenizers` library's tokenizer.json, which transformers writes from it."""
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(src), use_fast=True).save_pretrained(str(tok))
    except (OSError, ValueError, ImportError) as e:
        raise SdcError(f"{src}: no tokenizer.json, and its T5 tokenizer could not be converted "
                       f"({str(e).splitlines()[0][:120]}); add the tokenizer.json that "
                       "T5TokenizerFast.save_pretrained writes") from None
    if not (tok / "tokenizer.json").is_file():
        raise SdcError(f"{src}: its tokenizer did not convert to tokenizer.json; add one")


def _copy_scheduler(source, tmp: Path) -> dict:
    sched = tmp / "scheduler"
    sched.mkdir()
    config = source.scheduler_config()
    (sched / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"class": config.get("_class_name"), "prediction_type": config.get("prediction_type",
                                                                             "epsilon")}


# generation defaults a family's pipelines use (a model folder's sdc.json overrides them):
# DeepFloyd IF's IFPipeline (100 steps, guidance 7) and IFSuperResolutionPipeline (50, 4)
FAMILY_DEFAULTS = {"deepfloyd": {"steps": 100, "guidance": 7.0, "upscale_steps": 50,
                                 "upscale_guidance": 4.0}}

# Optimum's pipeline class for each family's build folder
OPTIMUM_PIPELINES = {"sd1": "ORTStableDiffusionPipeline", "sd2": "ORTStableDiffusionPipeline",
                     "sdxl": "ORTStableDiffusionXLPipeline"}


def _write_model_index(tmp: Path, family: Family, stages, scheduler_class: str | None) -> None:
    """Optimum's layout: a model_index.json naming each component folder and the build's real
    scheduler class (from its scheduler_config.json, not a fixed PNDM)."""
    if family.name not in OPTIMUM_PIPELINES:  # no Optimum pipeline reads this family's layout
        return
    index = {"_class_name": OPTIMUM_PIPELINES[family.name], "_sdc": "see manifest.json",
             "scheduler": ["diffusers", scheduler_class or "PNDMScheduler"]}
    for encoder in family.text_encoders:
        index[encoder.tokenizer] = ["transformers", "CLIPTokenizer"]
    for stage in stages:
        index[stage] = ["optimum", "ORTModel"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_component_configs(source, tmp: Path, stages) -> None:
    """Each model folder gets its source component's own config.json: the transformers config for
    the text encoder, the diffusers configs of the UNet and the VAE for the VAE graphs. Optimum's
    ORT pipeline reads them (unet sample_size/in_channels, text encoder num_hidden_layers, VAE
    block_out_channels and scaling_factor: a missing scaling_factor only warns there and draws a
    wrong image), so they are the model's real configs, copied whole, never rebuilt from ours."""
    configs = source.configs()
    for stage in stages:
        config = configs[source.spec.spec(stage).component]
        (tmp / stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def default_out(opts: BuildOptions, source_name: str, loras=()) -> Path:
    """artifacts/<model>[+<lora>...]-<precision>: a LoRA build never replaces its base build."""
    name = "+".join([source_name] + [Path(lo.path).stem for lo in loras])
    return opts.artifacts_root / f"{name}-{opts.precision}"


def _read_embeddings(source, opts: BuildOptions) -> list[dict]:
    """--embedding files read and given token ids after the base tokenizer's vocabulary."""
    if not opts.embeddings:
        return []
    from ..fusion.torch_apply import plan_embeddings

    family, configs = source.spec, source.configs()
    return plan_embeddings({e.stage: source.tokenizer_dir(e.tokenizer)
                            for e in family.text_encoders}, opts.embeddings,
                           {e.stage: configs[e.stage]["hidden_size"] for e in family.text_encoders},
                           family=family)


def _read_adapters(source, opts: BuildOptions, log) -> list:
    """Every --lora parsed and matched against this model's modules before any export starts."""
    if not opts.loras:
        return []
    from ..fusion.lora import read_lora
    from ..fusion.torch_apply import known_from_configs

    known = known_from_configs(source.configs(), source.spec)
    adapters = [(read_lora(spec.path, known), spec) for spec in opts.loras]
    for lora, spec in adapters:
        comps = sorted({layer.component for layer in lora.layers})
        missing = [c for c in comps if c not in opts.stages]
        if missing:
            raise SdcError(f"--lora {lora.path} changes {', '.join(missing)}, which --stages leaves "
                           "out; build those stages too")
        log(f"lora: {lora.name} ({lora.format}, {len(lora.layers)} layers in "
            f"{', '.join(comps)}, rank {'/'.join(map(str, lora.ranks()))}, weight {spec.weight:g}"
            + (f", blocks {spec.blocks}" if spec.blocks else "") + ")")
    return adapters


def build(opts: BuildOptions, log: Callable[[str], None] = print) -> BuildResult:
    from dataclasses import replace

    from ..quant import plan as qp

    if opts.precision not in qp.RECIPES:
        raise SdcError(f"--precision {opts.precision}: expected one of {', '.join(qp.RECIPES)}")
    if opts.precision not in PRECISIONS or opts.stage_precision:
        from ..quant.build import QuantizeOptions, quantize_build

        # The float build a quantized one is made from: fp16 only when asked for (a GPU build
        # with some stages quantized), else fp32 (the CPU's type, and the widest source).
        float_precision = "fp16" if opts.precision == "fp16" else "fp32"
        from ..families import FAMILIES

        every = opts.stages or sorted({s for f in FAMILIES.values() for s in f.stages})
        qp.parse_stage_precision(opts.stage_precision if isinstance(opts.stage_precision, str)
                                 else None, every)  # bad flags fail before any export
        source = build(replace(opts, precision=float_precision, out=None, stage_precision=None),
                       log)
        log(f"float source: {source.out}; quantizing")
        out, manifest, reused = quantize_build(QuantizeOptions(
            from_dir=source.out, precision=opts.precision,
            stage_precision=opts.stage_precision or {}, block_size=opts.block_size,
            quality_target=opts.quality_target, measure_all=opts.measure_all, out=opts.out,
            force=opts.force, artifacts_root=opts.artifacts_root), log)
        return BuildResult(out, manifest, reused)
    return _build_float(opts, log)


def _check_stages(opts: BuildOptions, family: Family, optional: tuple = ()) -> None:
    """`optional`: stages the model lacks a source for (IF's unet_2 without --upscaler), left out
    of the default set and refused when asked for."""
    if opts.stages is None:
        opts.stages = tuple(s for s in family.stages if family.spec(s).component not in optional)
    wanted = [s for s in opts.stages if s in family.stages
              and family.spec(s).component in optional]
    if wanted:
        raise SdcError(f"--stages {', '.join(wanted)}: the stage II UNet comes from the IF-II "
                       "folder; give it with --upscaler DIR, or build stage I alone "
                       "(--stages text_encoder,unet)")
    unknown = [s for s in opts.stages if s not in family.stages]
    if unknown or not opts.stages:
        raise SdcError(f"--stages: unknown stage(s) {', '.join(unknown) or '(none given)'} for "
                       f"{family.title}; expected some of {', '.join(family.stages)}")
    if opts.unet_chunks not in (0, 1) and family.space == "pixel":
        raise SdcError(f"--unet-chunks: not built for {family.title} yet (its UNets run whole; "
                       "put the T5 encoder on the CPU with `sdc run --stage-provider "
                       "text_encoder=cpu` to keep it out of the device budget)")
    if opts.unet_chunks not in (0, 1):
        from .unet_chunks import MAX_CHUNKS

        if not isinstance(opts.unet_chunks, int) or not 2 <= opts.unet_chunks <= MAX_CHUNKS:
            raise SdcError(f"--unet-chunks {opts.unet_chunks}: expected an integer from 2 to "
                           f"{MAX_CHUNKS} (or 1: the UNet whole)")
        if family.one("denoise") not in opts.stages:
            raise SdcError("--unet-chunks cuts the UNet graph, which --stages leaves out; add "
                           + family.one("denoise"))
    else:
        opts.unet_chunks = 0


def _build_float(opts: BuildOptions, log: Callable[[str], None] = print) -> BuildResult:
    from .sources import resolve_model

    # Never reach a model hub: every config and tokenizer file is local or shipped.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    source = resolve_model(opts.model, opts.config, opts.upscaler)
    try:
        _check_stages(opts, source.spec, source.optional_components())
        out = Path(opts.out) if opts.out else default_out(opts, source.name, opts.loras)
        out = out.absolute()
        listed = check_out(out)
        if source.builtin:
            log(f"model: {source.name} — {source.note}")
        else:
            log(f"model: {source.name} ({source.kind}, {source.family}) from {source.path}")
        adapters = _read_adapters(source, opts, log)
        versions = _versions()
        source_hash = source.content_hash()
        embeddings = _read_embeddings(source, opts)
        key = build_key(source_hash, opts, versions,
                        [{"sha256": a.sha256, "weight": s.weight, "blocks": s.blocks}
                         for a, s in adapters], embeddings)
        if not opts.force and (manifest := reusable(out, key, log)):
            log(f"up to date: {out} (build key {key[:12]}, every file hashed); --force rebuilds")
            return BuildResult(out, manifest, reused=True)
        with store.staging(out) as tmp:
            manifest = _build_into(tmp, source, source_hash, key, versions, opts, log, t_start,
                                   adapters, embeddings)
            _check_cancel(opts)
            store.commit(tmp, out, listed)
        log(f"wrote {out} in {manifest['build']['seconds']:.1f} s, peak RSS "
            f"{manifest['build']['peak_rss_bytes'] / 2**30:.2f} GiB")
        return BuildResult(out, manifest, reused=False)
    finally:
        source.close()


def _build_into(tmp: Path, source, source_hash: str, key: str, versions: dict, opts: BuildOptions,
                log, t_start: float, adapters: list, embeddings: list) -> dict:
    from ..fusion.fuse import plan, report

    fusion = None
    if adapters or embeddings:
        from ..fusion.torch_apply import TorchFusion

        fusion = TorchFusion(plan(adapters), embeddings, keep=opts.precision == "fp16")
    dims = source.dims()
    family = source.spec
    stages = [s for s in family.stages if s in opts.stages]
    by_component: dict[str, list[str]] = {}
    for s in stages:
        by_component.setdefault(family.spec(s).component, []).append(s)
    results = {}
    for component, comp_stages in by_component.items():
        # fp32 graphs first: the module is cast to fp16 in place for the fp16 ones.
        comp_stages.sort(key=lambda s: family.spec(s).fp16_policy != "fp32")
        _check_cancel(opts)
        results.update(_build_component(source, component, comp_stages, opts.precision, dims,
                                        tmp, log, fusion, opts.unet_chunks))
        _check_cancel(opts)
    _copy_tokenizers(source, tmp, embeddings)
    scheduler = _copy_scheduler(source, tmp)
    from .if_source import write_cascade

    cascade = write_cascade(tmp, source) if "unet_2" in stages else None
    _write_model_index(tmp, family, stages, scheduler["class"])
    _write_component_configs(source, tmp, stages)
    files = dict(mf.file_entry(tmp, p) for p in sorted(tmp.rglob("*")) if p.is_file())
    model = {**dims.as_dict(), "prediction_type": scheduler["prediction_type"],
             "default_size": source.native_size()}
    graphs = {s: _graph_entry(family.spec(s), results[s], dims, tmp, files) for s in stages}
    _check_cancel(opts)
    from .profile import profile_build

    family_block = family.describe(stages, source.model_index().get(
        "force_zeros_for_empty_prompt", False))
    memory_profile = profile_build(tmp, graphs, model, family_block, log)
    manifest = {
        "format": mf.FORMAT,
        "format_version": mf.FORMAT_VERSION,
        "layout": BUILD_LAYOUT,
        "build_key": key,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "base_model": {
            "name": source.name, "kind": source.kind, "family": source.family,
            "source": str(source.path) if not source.builtin else "built-in",
            "sha256": source_hash, "a1111_hash": source.a1111_hash(),
            "builtin": source.builtin, "note": source.note,
        },
        "defaults": {**FAMILY_DEFAULTS.get(family.name, {}), **source.defaults()},
        "precision": opts.precision,
        "family": family_block,
        "model": model,
        "pipeline": [s for s in family.pipeline if s in stages],
        "scheduler": {"class": scheduler["class"], "config": "scheduler/scheduler_config.json"},
        **({"cascade": cascade} if cascade else {}),
        "tokenizer": {"files": sorted(r for r in files if r.split("/")[0] in
                                      {e.tokenizer for e in family.text_encoders}),
                      "max_length": dims.max_sequence},
        "graphs": graphs,
        "memory_profile": memory_profile,
        "loras": [{**r, "applied": "build"}
                  for r in report(adapters, fusion.max_delta if fusion else {})],
        "embeddings": [{k: v for k, v in e.items() if k != "vectors_data"} for e in embeddings],
        "files": files,
        "build": {"seconds": round(time.perf_counter() - t_start, 2),
                  "peak_rss_bytes": process_peak_rss_bytes()},
    }
    mf.write_manifest(tmp, manifest)
    return manifest
