"""`sdc eval`'s study: several builds of one model, the same prompts, seeds and initial latents, and
what each build costs (bytes, load time, time per image, peak memory, provider) and loses (PSNR,
SSIM, max pixel error against a reference build; each graph's drift on fixed inputs; prompt
adherence for sdc-tiny). Torch-free: it drives the runtime (`run_pipeline`, `open_session`) only.

Everything is checked before anything runs (builds, stages, models, prompts, seeds, sizes, the
output folder), so bad input is one SdcError line and nothing is written.
"""

from __future__ import annotations

import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SdcError
from . import metrics

OUT_FILES = ("eval.json", "eval.md", "grid.png")  # all an --out folder may hold already: a rerun
MAX_SEEDS = 1000  # images per prompt; more is a typo, not a study
MAX_PROMPTS = 1000
FIXED_INPUT_SEED = 20261201  # the graphs' fixed inputs: one seed, so every build sees the same feeds
# Generic prompts for models other than sdc-tiny: any text works, the comparison is build vs build.
GENERIC_PROMPTS = ("a lighthouse on a cliff at dusk", "a bowl of fruit on a wooden table")
TINY_PROMPTS = 2  # default sdc-tiny prompts (x --seeds images); see adherence.default_prompts


@dataclass
class EvalOptions:
    builds: tuple  # build folders (Path | str), at least one
    reference: Path | str | None = None  # None: the first fp32 build among `builds`, else the first
    prompts: Path | str | list | None = None  # a text file (one prompt a line) or a list; None: defaults
    seeds: int = 2  # seeds 0 .. seeds-1 for every prompt
    width: int | None = None  # pixels; None: the reference model's native size
    height: int | None = None
    steps: int | None = None  # None: the reference build's default (sdc-tiny: 20), else 20
    guidance: float | None = None  # None: the reference build's default (sdc-tiny: 3), else 7.5
    scheduler: str | None = None  # None: the build's own
    provider: str = "auto"  # auto | cpu | cuda
    out: Path | str = Path("outputs/eval")
    allow_different_models: bool = False  # compare builds of different base models anyway


@dataclass
class EvalResult:
    report: dict  # everything eval.json holds
    images: dict = field(default_factory=dict)  # build name -> [PIL image per job], job order
    out: Path | None = None  # where eval.json / eval.md / grid.png were written


# ---------------------------------------------------------------------------------------------
# checks (before any work)

def _read_prompts(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        lines = [str(p) for p in value]
    else:
        path = Path(value)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or type(e).__name__
            raise SdcError(f"--prompts {path}: cannot read ({reason}); expected a UTF-8 text file "
                           "with one prompt a line") from None
        lines = text.splitlines()
    prompts = [p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#")]
    if not prompts:
        raise SdcError(f"--prompts {value}: no prompts in it; expected one prompt a line "
                       "(blank lines and # comments are skipped)")
    if len(prompts) > MAX_PROMPTS:
        raise SdcError(f"--prompts {value}: {len(prompts)} prompts, at most {MAX_PROMPTS}")
    return prompts


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SdcError(f"--out {out}: exists and is not a folder; give a new or empty folder")
    if out.is_dir():
        # ours: the three outputs, and the temporary files of an eval killed mid-write (-9)
        other = sorted(p.name for p in out.iterdir() if p.name not in OUT_FILES
                       and not any(p.name.startswith(f".{f}.") and p.name.endswith(".tmp")
                                   for f in OUT_FILES))
        if other:
            raise SdcError(f"--out {out}: holds other files ({', '.join(other[:3])}"
                           f"{', …' if len(other) > 3 else ''}); give a new or empty folder, or "
                           "one holding only a previous eval's output")


def _model_identity(manifest: dict) -> dict:
    """What makes two builds builds *of the same model*: base weights and model constants."""
    return {"sha256": manifest["base_model"].get("sha256"), **manifest["model"]}


def _names(folders: list[Path]) -> list[str]:
    """Row names: the folder names, with the parent prepended where two would collide."""
    names = [f.name for f in folders]
    return [f"{f.parent.name}/{f.name}" if names.count(f.name) > 1 else f.name for f in folders]


@dataclass
class _Plan:
    """The checked settings of one study."""

    folders: list[Path]  # reference first
    names: list[str]
    manifests: list[dict]
    prompts: list[str]
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance: float
    stages: list[str]  # the reference's pipeline
    graphs: list[str]  # graphs compared on fixed inputs (present in the reference)
    out: Path
    tiny: bool  # sdc-tiny: adherence is scored


def check(opts: EvalOptions) -> _Plan:
    from ..runtime.manifest import load_manifest
    from ..runtime.pipeline import FALLBACK_DEFAULTS, MAX_STEPS
    from ..runtime.sessions import resolve_providers

    if not opts.builds:
        raise SdcError("sdc eval: give at least one build folder (ART ...)")
    if isinstance(opts.seeds, bool) or not isinstance(opts.seeds, int) \
            or not 1 <= opts.seeds <= MAX_SEEDS:
        raise SdcError(f"--seeds {opts.seeds}: expected an integer from 1 to {MAX_SEEDS} "
                       "(images per prompt)")
    folders = [Path(b) for b in opts.builds] + ([Path(opts.reference)] if opts.reference else [])
    for f in folders:
        if not f.is_dir():
            raise SdcError(f"build not found: {f}; give folders written by `sdc build`")
    folders = folders[:len(opts.builds)]
    manifests = [load_manifest(f) for f in folders]
    if len({f.resolve() for f in folders}) != len(folders):
        raise SdcError("sdc eval: the same build is given twice; give each build once")
    if opts.reference is not None:
        ref = Path(opts.reference)
        hit = [i for i, f in enumerate(folders) if f.resolve() == ref.resolve()]
        if hit:
            ref_i = hit[0]
        else:  # a reference not among the builds is studied too, as the first row
            folders.insert(0, ref)
            manifests.insert(0, load_manifest(ref))
            ref_i = 0
    else:
        ref_i = next((i for i, m in enumerate(manifests) if m.get("precision") == "fp32"), 0)
    order = [ref_i] + [i for i in range(len(folders)) if i != ref_i]
    folders = [folders[i] for i in order]
    manifests = [manifests[i] for i in order]
    names = _names(folders)
    ref = manifests[0]

    want = _model_identity(ref)
    for name, m in zip(names[1:], manifests[1:]):
        got = _model_identity(m)
        if got != want and not opts.allow_different_models:
            diff = [k for k in want if want.get(k) != got.get(k)] or ["model constants"]
            raise SdcError(
                f"{name} is a build of {m['base_model'].get('name')!r} but the reference "
                f"{names[0]} is of {ref['base_model'].get('name')!r} (they differ in "
                f"{', '.join(diff[:4])}); compare builds of one model, or pass "
                "--allow-different-models")
    stages = list(ref["pipeline"])
    for name, m in zip(names, manifests):
        for stage in stages:
            if stage not in m["graphs"]:
                raise SdcError(f"{name}: has no {stage} graph, which the reference's pipeline "
                               f"({' -> '.join(stages)}) needs; rebuild it with every stage")
        if list(m["pipeline"]) != stages:
            raise SdcError(f"{name}: its pipeline {m['pipeline']} differs from the reference's "
                           f"{stages}; compare builds of one model family")
    # graphs compared on fixed inputs: the pipeline's, plus the optional ones every build has
    graphs = stages + sorted(g for g in ref["graphs"] if g not in stages
                             and all(g in m["graphs"] for m in manifests))

    tiny = ref["base_model"].get("name") == "sdc-tiny"
    if opts.prompts is not None:
        prompts = _read_prompts(opts.prompts)
    elif tiny:
        from .adherence import default_prompts

        prompts = default_prompts(TINY_PROMPTS)
    else:
        prompts = list(GENERIC_PROMPTS)

    model = ref["model"]
    multiple = model["vae_scale_factor"] * model["unet_multiple"]
    size = {}
    for key in ("width", "height"):
        v = getattr(opts, key)
        if v is None:
            v = model.get("default_size", 512)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % multiple:
            raise SdcError(f"--{key} {v}: expected a positive multiple of {multiple} (VAE factor x "
                           "UNet multiple)")
        size[key] = v
    own = ref.get("defaults") or {}
    steps = opts.steps if opts.steps is not None else own.get("steps", FALLBACK_DEFAULTS["steps"])
    guidance = opts.guidance if opts.guidance is not None \
        else own.get("guidance", FALLBACK_DEFAULTS["guidance"])
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise SdcError(f"--steps {steps}: expected an integer from 1 to {MAX_STEPS}")
    if opts.scheduler is not None:
        from ..runtime.schedulers import SCHEDULERS

        if opts.scheduler not in SCHEDULERS:
            raise SdcError(f"--scheduler {opts.scheduler}: expected one of {', '.join(SCHEDULERS)}")
    resolve_providers(opts.provider)  # an unavailable provider fails before any work
    out = Path(opts.out)
    _check_out(out)
    return _Plan(folders, names, manifests, prompts, list(range(opts.seeds)), size["width"],
                 size["height"], steps, float(guidance), stages, graphs, out, tiny)


# ---------------------------------------------------------------------------------------------
# measurements

def _sizes(folder: Path, manifest: dict) -> dict:
    """Bytes on disk per stage (every file under the stage's folder, tiled/chunked graphs too) and
    in total (every manifest-listed file plus manifest.json), and weight bytes by dtype per stage
    from graphs.<stage>.weights.data ([offset, length, dtype, shape] per initializer)."""
    per_stage: dict[str, int] = defaultdict(int)
    for rel, entry in manifest["files"].items():
        per_stage[rel.split("/", 1)[0] if "/" in rel else "(top level)"] += int(entry["bytes"])
    weights = {}
    for stage, graph in manifest["graphs"].items():
        by_dtype: dict[str, int] = defaultdict(int)
        for _, (_, length, dtype, _) in ((graph.get("weights") or {}).get("data") or {}).items():
            by_dtype[dtype] += int(length)
        weights[stage] = dict(by_dtype)
    total = sum(per_stage.values()) + (folder / "manifest.json").stat().st_size
    return {"total_bytes": total, "stages": dict(per_stage), "weights_by_dtype": weights}


def fixed_inputs(graph: dict, plan: _Plan, stage_index: int) -> dict[str, np.ndarray]:
    """Seeded inputs for one graph from the reference's declared input schema (float32 / int64;
    each build's own dtypes are applied when it is fed). Symbolic dims take this study's sizes."""
    ref = plan.manifests[0]
    f = ref["model"]["vae_scale_factor"]
    dims = {"batch": 1, "sequence": ref["tokenizer"]["max_length"],
            "latent_height": plan.height // f, "latent_width": plan.width // f,
            "height": plan.height, "width": plan.width}
    rng = np.random.default_rng([FIXED_INPUT_SEED, stage_index])
    feeds = {}
    for spec in graph["inputs"]:
        shape = []
        for d in spec["shape"]:
            if isinstance(d, int):
                shape.append(d)
            elif d in dims:
                shape.append(dims[d])
            else:
                raise SdcError(f"{spec['name']}: symbolic dim {d!r} has no size in sdc eval "
                               f"(knows {', '.join(dims)}); this build is newer than sdc eval")
        if np.issubdtype(np.dtype(spec["dtype"]), np.integer):
            # token ids: any id the vocabulary has (ids past the end would index out of range)
            high = int(ref["model"].get("vocab_size") or 256)
            feeds[spec["name"]] = rng.integers(0, high, shape).astype(np.int64)
        elif len(shape) == 1:
            # the only rank-1 float input of an SD graph is the UNet's timestep: a training-range
            # timestep, not unit noise (t ~ 0.3 would sit outside anything the model has seen)
            feeds[spec["name"]] = rng.uniform(0, 1000, shape).astype(np.float32)
        else:
            feeds[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _graph_outputs(folder: Path, manifest: dict, plan: _Plan, provider: str):
    """Each compared graph run once on the fixed inputs, one session at a time: its output
    (float32), session load time and provider."""
    from ..runtime.sessions import free_memory, open_session

    out = {}
    ref_graphs = plan.manifests[0]["graphs"]
    for i, stage in enumerate(plan.graphs):
        graph = manifest["graphs"][stage]
        dtypes = {t["name"]: t["dtype"] for t in graph["inputs"]}
        feeds = {k: v.astype(dtypes.get(k, v.dtype))
                 for k, v in fixed_inputs(ref_graphs[stage], plan, i).items()}
        sess = open_session(folder, stage, graph, provider)
        multiple = graph.get("latent_multiple", 1)
        y = sess.run(feeds, multiple).astype(np.float32)
        out[stage] = {"output": y, "load_seconds": sess.load_seconds, "provider": sess.provider}
        del sess  # one graph at a time: the next one's weights take its place
        free_memory()
    return out


def _timing(seconds: list[float]) -> dict:
    """The first image apart (warm-up: caches, allocator growth), mean ± std over the rest."""
    rest = metrics.spread(seconds[1:])
    return {"first_s": seconds[0], "mean_s": rest["mean"], "std_s": rest["std"],
            "n": rest["n"], "all_s": seconds}


def environment() -> dict:
    """Versions and machine, so a table can be traced to where it was measured."""
    from importlib import metadata

    from .. import __version__
    from ..runtime.memory import memory_limit_bytes

    versions = {"sdc": __version__, "python": platform.python_version()}
    for dist in ("numpy", "onnxruntime", "onnxruntime-gpu", "scikit-image", "scipy", "pillow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"versions": versions,
            "machine": {"cpu": cpu, "cores": cores, "memory_bytes": memory_limit_bytes(),
                        "platform": platform.platform(), "python": sys.version.split()[0]}}


# ---------------------------------------------------------------------------------------------
# the study

def evaluate(opts: EvalOptions, log: Callable[[str], None] | None = None,
             progress: Callable[[int, int, str], None] | None = None,
             write: bool = True) -> EvalResult:
    """Run the study and (write=True) write eval.json, eval.md and grid.png into opts.out."""
    from ..runtime.manifest import verify_files
    from ..runtime.pipeline import GenerateOptions, run_pipeline

    log = log or (lambda msg: None)
    progress = progress or (lambda done, total, what: None)
    plan = check(opts)
    for name, folder, m in zip(plan.names, plan.folders, plan.manifests):
        problems = verify_files(folder, m, hashes=True)  # once per build, not once per image
        if problems:
            raise SdcError(f"{name}: {len(problems)} file(s) do not match its manifest "
                           f"({'; '.join(problems[:2])}); rebuild it or run `sdc verify`")

    ref = plan.manifests[0]["model"]
    f, c = ref["vae_scale_factor"], ref["latent_channels"]
    # the initial noise, once: image (prompt, seed) of every build starts from this same array,
    # drawn as `sdc run --seed S` draws it, so the eval's pictures are `sdc run`'s pictures
    latents = {s: np.random.default_rng(s).standard_normal((1, c, plan.height // f, plan.width // f),
                                                           dtype=np.float32)
               for s in plan.seeds}
    jobs = [(p, s) for p in plan.prompts for s in plan.seeds]
    total = len(plan.folders) * (len(jobs) + 1)  # +1: the fixed-input graph pass of each build
    done = 0
    images: dict[str, list] = {}
    rows = []
    ref_outputs = None
    for name, folder, manifest in zip(plan.names, plan.folders, plan.manifests):
        log(f"[eval] {name}: {len(jobs)} image(s)")
        seconds, stage_s, peaks, providers, warnings, pics = [], defaultdict(list), [], set(), [], []
        for prompt, seed in jobs:
            progress(done, total, f"{name}: image {len(pics) + 1}/{len(jobs)}")
            gen = GenerateOptions(prompt=prompt, artifacts=folder, steps=plan.steps,
                                  guidance=plan.guidance, seed=seed, width=plan.width,
                                  height=plan.height, scheduler=opts.scheduler,
                                  provider=opts.provider, latents=latents[seed], verify=False)
            t0 = time.perf_counter()
            res = run_pipeline(gen)
            seconds.append(time.perf_counter() - t0)
            for k, v in res.timings.items():
                stage_s[k].append(v)
            peaks.append(res.memory.get("peak_bytes"))
            providers.update(res.providers.values())
            warnings += [w for w in res.warnings if w not in warnings]
            pics.append(res.images[0])
            done += 1
        progress(done, total, f"{name}: graphs on fixed inputs")
        outputs = _graph_outputs(folder, manifest, plan, opts.provider)
        done += 1
        if ref_outputs is None:
            ref_outputs = outputs
        images[name] = pics
        known = [p for p in peaks if p is not None]
        rows.append({
            "name": name, "path": str(folder), "precision": manifest.get("precision"),
            "base_model": manifest["base_model"].get("name"),
            "base_sha256": manifest["base_model"].get("sha256"),
            "size": _sizes(folder, manifest),
            "load_seconds": {s: o["load_seconds"] for s, o in outputs.items()},
            "time_per_image": _timing(seconds),
            "stage_seconds": {k: metrics.spread(v) for k, v in stage_s.items()},
            # RSS above the interpreter+libraries baseline (runtime/memory.py), VmHWM reset at the
            # start of each image, so this is the build's own peak even in one process
            "peak_bytes": max(known) if known else None,
            "providers": sorted(providers | {o["provider"] for o in outputs.values()}),
            "warnings": warnings,
            "graphs": {s: {**metrics.graph_drift(o["output"], ref_outputs[s]["output"]),
                           "shape": list(o["output"].shape)} for s, o in outputs.items()},
        })
        del outputs
    progress(done, total, "scoring")

    ref_name = plan.names[0]
    job_rows = [{"prompt": p, "seed": s} for p, s in jobs]
    for row in rows:
        per = [metrics.image_quality(np.asarray(a), np.asarray(b))
               for a, b in zip(images[row["name"]], images[ref_name])]
        row["quality"] = {"per_image": per, **metrics.quality_summary(per)}
        row["adherence"] = _adherence(images[row["name"]], jobs) if plan.tiny else None
    ref_row = rows[0]
    for row in rows:
        row["compression"] = ref_row["size"]["total_bytes"] / row["size"]["total_bytes"]
        a, b = ref_row["time_per_image"], row["time_per_image"]
        ta = a["mean_s"] if a["mean_s"] is not None else a["first_s"]
        tb = b["mean_s"] if b["mean_s"] is not None else b["first_s"]
        row["speedup"] = ta / tb if tb else None

    report = {
        "settings": {"reference": ref_name, "builds": [r["path"] for r in rows],
                     "prompts": plan.prompts, "seeds": plan.seeds, "width": plan.width,
                     "height": plan.height, "steps": plan.steps, "guidance": plan.guidance,
                     "scheduler": opts.scheduler or "each build's own",
                     "provider": opts.provider, "graphs": plan.graphs,
                     "fixed_input_seed": FIXED_INPUT_SEED,
                     "allow_different_models": opts.allow_different_models,
                     "latents": "numpy PCG64 standard normal per seed, float32 "
                                f"[1, {c}, {plan.height // f}, {plan.width // f}], the same "
                                "arrays for every build"},
        "jobs": job_rows,
        **environment(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "builds": rows,
    }
    result = EvalResult(report, images)
    if write:
        from .report import write_outputs

        result.out = write_outputs(plan.out, report, images)
    progress(total, total, "done")
    return result


def _adherence(pics: list, jobs: list) -> dict | None:
    """sdc-tiny detectors on each image whose prompt is in the caption grammar."""
    from .adherence import expected_for, score, summarise

    scored = []
    for img, (prompt, seed) in zip(pics, jobs):
        expected = expected_for(prompt)
        if expected is None:
            continue
        r = score(img, expected)
        scored.append({"prompt": prompt, "seed": seed,
                       **{k: r[k] for k in ("colour", "background", "shape", "all")},
                       "detected": {k: r["detected"][k] for k in ("colour", "background", "shape")}})
    if not scored:
        return None
    return {**summarise(scored), "per_image": scored}
