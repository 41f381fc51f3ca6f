"""The runtime Engine: one build loaded and verified once, its stages as methods.

`sdc run`, `sdc.runtime.generate` and `sdc serve` all go through it. A request is a
`GenerateOptions`; `Engine.generate` validates it against the build (runtime/pipeline.py's
checks), plans it under the memory budget (runtime/planner.py), then composes the stages:

    encode_prompt -> initial_latents (encode_image for img2img) -> denoise -> decode -> images

Sessions: `keep_sessions=False` (`sdc run`) creates each stage's session, uses it and releases it
before the next, so the process holds one graph's weights at once. `keep_sessions=True` (a warm
server) keeps them loaded across requests when the plan's resident peak (every stage's session
held at once) fits the budget; otherwise the request runs streamed, as `sdc run` does, and the
sessions it released are created again by the next request.

Adapters (runtime/adapters.py): a request's LoRAs are fused from the base weights once and cached
in an LRU bounded in bytes. Weights that are adapter slots of the graph are bound to the resident
session per run, so switching between cached adapters creates no session; other weights (LoCon
3x3 convs, builds made before slots) go in at session creation, so such a session is created for
that adapter (and again when the adapter changes).

Files: `verify()` hashes every file the manifest lists, once. Before each request the files' sizes,
modification times and inodes are compared with what was verified, and a changed file is hashed
again (and refused if it no longer matches), so a build replaced under a running server is never
half-read.

Semantics follow diffusers' StableDiffusionPipeline so images match it given the same initial
latents: negative prompt first in the CFG batch, guidance applied only when > 1, latents scaled
by the scheduler's init sigma, VAE fed latents / scaling_factor, pixels (x / 2 + 0.5) rounded to
uint8. Seeds: image i of a batch uses seed S + i with numpy's PCG64 for its initial noise (and
then its ancestral noise), so each image reproduces alone.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SdcError
from .adapters import AdapterCache, FusedSet, fuse_set, parse_specs
from .manifest import load_manifest, referenced_files, stage_with, verify_files
from .pipeline import (GenerateOptions, GenerateResult,
                       _close_opened, _init_array, _init_size, _load_latents, _open_init_image,
                       _plan, _to_images, _validate, resolve_artifacts, with_model_defaults)
from .store import contained, read_json_object

DEFAULT_LORA_CACHE = 2 * 2**30


class Cancelled(SdcError):
    """The request was cancelled (its client went away) before it finished."""


@dataclass
class Job:
    """A validated, planned request."""

    opts: GenerateOptions  # with the model's defaults filled in; prompt as typed
    text: str  # the prompt the tokenizer sees (lora tags taken out)
    width: int
    height: int
    scheduler: str
    plan: object  # planner.Plan or None (builds without a memory profile)
    init: np.ndarray | None
    latents: np.ndarray | None  # given initial noise, checked against the request's shape
    specs: list  # fusion.fuse.LoraSpec, from --lora and <lora:...> tags
    placement: dict = field(default_factory=dict)  # {stage: provider} over the Engine's provider
    # pixel cascades (DeepFloyd IF): the denoising stages run, and the images' size
    cascade: list = field(default_factory=list)
    out_size: tuple | None = None


@dataclass
class _Run:
    """One request's state as it moves through the stages."""

    job: Job
    log: Callable[[str], None]
    progress: Callable[[str, int, int], None]
    observe: Callable[[str, dict], None] | None
    should_stop: Callable[[], str | None]
    seeds: list[int]
    rngs: list
    adapters: FusedSet | None
    keep: bool
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    providers: dict[str, str] = field(default_factory=dict)
    truncated: bool = False
    interrupted: bool = False


@dataclass
class EngineStats:
    requests: int = 0
    images: int = 0
    sessions_created: int = 0
    # per stage session: an adapter's weights bound to its slots (no session created), and
    # sessions created because an adapter has weights outside the slots
    adapter_binds: int = 0
    adapter_sessions: int = 0
    stage_seconds: dict = field(default_factory=dict)  # stage -> [count, total seconds]
    peak_bytes: int = 0  # the largest per-request peak above the baseline seen


class Engine:
    def __init__(self, artifacts: Path | str | None = None, *, provider: str = "auto",
                 keep_sessions: bool = False, vram_budget: int | str | None = None,
                 lora_cache: int | str = DEFAULT_LORA_CACHE, lora_dir: Path | str | None = None,
                 threads: int | None = None, stage_providers: str | dict | None = None):
        from .placement import parse_stage_providers

        from .memory import parse_size
        from .sessions import PROVIDERS

        if provider not in PROVIDERS:
            raise SdcError(f"--provider {provider}: expected one of {', '.join(PROVIDERS)}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or not 1 <= threads <= 1024):
            raise SdcError(f"--threads {threads}: expected an integer from 1 to 1024")
        self.folder = resolve_artifacts(artifacts)
        self.manifest = load_manifest(self.folder)
        self.provider = provider
        self.keep_sessions = keep_sessions
        self.vram_budget = vram_budget
        limit = parse_size(lora_cache) if isinstance(lora_cache, str) else int(lora_cache)
        self.adapters = AdapterCache(limit)
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.threads = threads  # onnxruntime intra-op threads per session; None: its default
        # {stage: provider} over `provider` (--stage-provider vae_decoder=cpu)
        self.stage_providers = parse_stage_providers(stage_providers, self.manifest["graphs"])
        self.stats = EngineStats()
        self._sessions: dict[tuple, tuple] = {}  # (stage, onnx file) -> (variant, StageSession)
        self._bound: dict[str, tuple] = {}  # stage -> (adapter key, {slot: OrtValue})
        self._verified: dict[str, tuple] | None = None  # file -> (size, mtime_ns, inode)
        self._tokenizers: dict[str, object] = {}
        # the family's stages by role (text encoders, UNet, decoder, image encoder)
        self.unet = stage_with(self.manifest, "denoise")
        self.decoder = stage_with(self.manifest, "decode")
        self.image_encoder = stage_with(self.manifest, "encode_image")
        self._scheduler_config = None
        self._baseline = 0
        self.lock = threading.Lock()  # one generation at a time per engine

    # --- the build ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.folder.name

    def verify(self, hashes: bool = True) -> None:
        """Check every listed file (sha256, or sizes only) and remember what was verified."""
        problems = verify_files(self.folder, self.manifest, hashes=hashes)
        if problems:
            raise SdcError(f"{self.folder}: {len(problems)} artifact file(s) do not match the "
                           "manifest (" + "; ".join(problems[:3]) + "); rebuild, or run "
                           "`sdc verify` for details")
        self._verified = {rel: _identity(self.folder / rel)
                          for rel in referenced_files(self.manifest)} if hashes else {}

    def check_unchanged(self) -> None:
        """Re-verify any file changed since `verify()` (cheap: a stat per file otherwise)."""
        if self._verified is None:
            raise AssertionError("Engine.verify() must run before the first request")
        if self.changed_files():
            self.release()
            self.verify(hashes=True)  # raises when a changed file no longer matches

    def verified_identities(self) -> dict:
        return dict(self._verified or {})

    def adopt_verification(self, identities: dict) -> None:
        """Take an earlier verification of this build's files (size, mtime, inode each) and
        re-hash only what changed since (raises when a changed file no longer matches)."""
        self._verified = dict(identities)
        self.check_unchanged()

    def changed_files(self) -> list[str]:
        """Files whose size, modification time or inode moved since `verify()`."""
        return [rel for rel, ident in (self._verified or {}).items()
                if _identity(self.folder / rel) != ident]

    # --- requests -------------------------------------------------------------------------------

    def prepare(self, opts: GenerateOptions) -> Job:
        """Validate and plan `opts` against this build; reads no weights, hashes nothing."""
        from .prompt_loras import resolve_tags, split_prompt

        if opts.artifacts is not None and Path(opts.artifacts).resolve() != self.folder.resolve():
            raise AssertionError("GenerateOptions.artifacts names another build than the Engine's")
        if opts.vram_budget is None and self.vram_budget is not None:
            opts = replace(opts, vram_budget=self.vram_budget)
        if opts.stage_providers is None and self.stage_providers:
            opts = replace(opts, stage_providers=self.stage_providers)
        if opts.provider != self.provider:
            opts = replace(opts, provider=self.provider)  # the Engine's sessions decide
        opts = with_model_defaults(opts, self.manifest)
        width, height, sched_name = _validate(opts, self.manifest)
        text, tags = split_prompt(opts.prompt)
        specs = parse_specs(opts.loras) + resolve_tags(tags, self.lora_dir)
        if specs:
            from ..fusion.artifact import check_float

            check_float(self.manifest, self.folder)  # a quantized build takes no adapters
        model = self.manifest["model"]
        init = img = None
        if opts.init_image is not None:  # the header gives the size; pixels after the plan
            img = _open_init_image(opts.init_image)
        try:
            if img is not None:
                width, height = _init_size(img, opts.width, opts.height,
                                           model["vae_scale_factor"] * model["unet_multiple"])
            plan = _plan(opts, self.manifest, width, height)  # a budget nothing fits: refused
            if img is not None:
                init = _init_array(img, opts.init_image, width, height)
        finally:
            _close_opened(img, opts.init_image)
        f = model["vae_scale_factor"]
        shape = (opts.batch, model["latent_channels"], height // f, width // f)
        given = _load_latents(opts.latents, shape) if opts.latents is not None else None
        from .placement import parse_stage_providers

        placement = parse_stage_providers(opts.stage_providers, self.manifest["graphs"])
        cascade, out_size = [], None
        if self.manifest["family"].get("space") == "pixel":
            from .cascade import cascade_stages, output_size

            cascade = cascade_stages(self.manifest, opts.cascade)
            out_size = output_size(self.manifest, cascade, width, height)
        return Job(opts, text, width, height, sched_name, plan, init, given, specs, placement,
                   cascade, out_size)

    def generate(self, opts: GenerateOptions, log=None, progress=None, observe=None,
                 should_stop=None) -> GenerateResult:
        """One request, start to finish (the server's entry point)."""
        with self.lock:
            job = self.prepare(opts)
            self.check_unchanged()
            return self.run(job, log=log, progress=progress, observe=observe,
                            should_stop=should_stop)

    def run(self, job: Job, log=None, progress=None, observe=None,
            should_stop=None) -> GenerateResult:
        """`observe(stage, feeds)` sees every graph's inputs as they are run (the quantizer's
        calibration reads real denoising trajectories this way); the final pixels are offered
        as the vae_encoder's input. `should_stop()` is asked after every denoising step:
        "interrupt" ends the loop and decodes the latents so far (A1111's interrupt),
        "cancel" raises Cancelled."""
        from .memory import import_runtime_libraries, peak_bytes, reset_peak, rss_bytes
        from .sessions import free_memory, resolve_providers

        opts, plan = job.opts, job.plan
        for provider in {self.provider, *job.placement.values()}:
            resolve_providers(provider)  # an unavailable provider fails before any work
        keep = self.keep_sessions and plan is not None and plan.resident_peak is not None and (
            plan.budget is None or plan.resident_peak <= plan.budget)
        if not keep:
            self.release()  # a streamed request starts from nothing resident
        import_runtime_libraries()  # the baseline is the interpreter plus these (memory.py)
        free_memory()
        if not self._sessions:
            self._baseline = rss_bytes()
        # with sessions resident from earlier requests, the baseline stays the one measured
        # before they were loaded: the peak reported (and held to the budget) includes them
        baseline = self._baseline
        exact_peak = reset_peak()
        seed = opts.seed if opts.seed is not None else secrets.randbelow(2**32)
        seeds = [seed + i for i in range(opts.batch)]
        run = _Run(job, log or (lambda msg: None), progress or (lambda stage, i, n: None),
                   observe, should_stop or (lambda: None), seeds,
                   [np.random.default_rng(s) for s in seeds], None, keep)
        if plan is not None:
            for line in plan.describe():
                run.log(f"[plan] {line}")
            if self.keep_sessions:
                run.log("[plan] sessions " + ("stay resident across requests" if keep else
                                              "streamed (their resident peak exceeds the budget)"))
        if job.specs:
            t0 = time.perf_counter()
            run.adapters = self.adapter_set(job.specs, run.log)
            self._timed(run, "lora", t0)  # hashing known files + a cache hit, or the fusion
        self.stats.requests += 1
        cond = self.encode_prompt(run)
        if job.cascade:  # a pixel cascade (DeepFloyd IF): no latents, no VAE
            from .cascade import run_cascade

            pixels = run_cascade(self, run, cond)
        else:
            latents, timesteps, scheduler = self.initial_latents(run)
            latents = self.denoise(run, latents, cond, timesteps, scheduler)
            pixels = self.decode(run, latents)
        report = run.adapters.report if run.adapters else []
        width, height = job.out_size or (job.width, job.height)
        images, params = _to_images(pixels, opts, self.manifest, seeds, width, height,
                                    job.scheduler, run.truncated, report)
        self.stats.images += len(images)
        peak = peak_bytes() if exact_peak else None
        if peak is not None:
            self.stats.peak_bytes = max(self.stats.peak_bytes, peak - baseline)
        memory = {"baseline_bytes": baseline,
                  "peak_bytes": peak - baseline if peak is not None else None,
                  "planned_peak_bytes": plan.peak if plan is not None else None,
                  "budget_bytes": plan.budget if plan is not None else None}
        if run.interrupted:
            run.warnings.append("interrupted: the images are decoded from the latents reached")
        return GenerateResult(images, seeds, params, run.timings, run.providers, run.warnings,
                              self.folder, plan, memory, opts, job.scheduler, run.interrupted)

    # --- adapters -------------------------------------------------------------------------------

    def adapter_set(self, specs: list, log) -> FusedSet | None:
        if not specs:
            return None
        key = self.adapters.key(specs)
        entry = self.adapters.get(key)
        if entry is None:
            t0 = time.perf_counter()
            entry = fuse_set(self.folder, self.manifest, specs, key)
            self.adapters.stats.fuse_seconds += time.perf_counter() - t0
            self.adapters.put(entry)
            for r in entry.report:
                log(f"[lora] {r['name']}: weight {r['weight']:g}, {r['layers']} layers fused "
                    f"({time.perf_counter() - t0:.2f} s)")
        else:
            log(f"[lora] {', '.join(r['name'] for r in entry.report)}: fused weights cached")
        return entry

    # --- sessions -------------------------------------------------------------------------------

    def _session(self, run: _Run, stage: str, graph: dict, onnx_file: str | None = None,
                 arena: bool = True, prepack: bool = True):
        """The stage's session for this run's adapters: resident when it can stay, else new."""
        from .sessions import free_memory, open_session

        swaps = (run.adapters.swaps.get(stage) if run.adapters else None) or None
        variant = run.adapters.key if swaps else None
        k = (stage, onnx_file or "")
        held = self._sessions.get(k)
        if held is not None and held[0] == variant:
            return held[1]
        if held is not None:  # another adapter's weights are baked into it: replace it
            del self._sessions[k], held
            self._bound.pop(stage, None)
            free_memory()
        if variant is not None:
            self.stats.adapter_sessions += 1
            run.log(f"[lora] {stage}: {len(swaps)} adapter weights are outside the build's "
                    "adapter slots; creating a session with them")
        budget = run.job.plan.budget if run.job.plan is not None else None
        session = open_session(self.folder, stage, graph, self._provider(run, stage),
                               onnx_file=onnx_file,
                               arena=arena, initializers=swaps, prepack=prepack,
                               cuda_mem_limit=budget, threads=self.threads)
        self.stats.sessions_created += 1
        run.warnings += [w for w in session.warnings if w not in run.warnings]
        if run.keep:
            self._sessions[k] = (variant, session)
        return session

    def _provider(self, run: _Run, stage: str) -> str:
        return run.job.placement.get(stage, self.provider)

    def _bound_slots(self, run: _Run, stage: str, session) -> dict | None:
        """{slot: OrtValue} to bind for this run's adapters (None: the base weights). A resident
        session keeps its adapter's values between requests, so asking again costs nothing."""
        arrays = run.adapters.slots.get(stage) if run.adapters else None
        if not arrays:
            return None
        held = self._bound.get(stage)
        if held is not None and held[0] == run.adapters.key and held[2] is session:
            return held[1]
        values = session.slot_values(arrays)
        self.stats.adapter_binds += 1
        if run.keep:
            self._bound[stage] = (run.adapters.key, values, session)
        return values

    def _done(self, run: _Run, stage: str) -> None:
        """After a stage: a streamed run frees its session before the next stage's loads."""
        from .sessions import free_memory

        if not run.keep:
            free_memory()

    def release(self) -> None:
        """Drop every resident session (the adapter cache stays)."""
        from .sessions import free_memory

        if self._sessions or self._bound:
            self._sessions.clear()
            self._bound.clear()
            free_memory()

    def close(self) -> None:
        self.release()
        self.adapters.clear()

    def _timed(self, run: _Run, stage: str, t0: float) -> None:
        seconds = time.perf_counter() - t0
        run.timings[stage] = seconds
        count_total = self.stats.stage_seconds.setdefault(stage, [0, 0.0])
        count_total[0] += 1
        count_total[1] += seconds

    # --- stages ---------------------------------------------------------------------------------

    def tokenizer(self, folder: str = "tokenizer", kind: str = "clip"):
        from .store import check_relative
        from .tokenizer import make_tokenizer

        if folder not in self._tokenizers:
            check_relative(folder, "family.text_encoders.tokenizer", self.folder)
            self._tokenizers[folder] = make_tokenizer(
                self.folder / folder, self.manifest["tokenizer"]["max_length"], kind)
        return self._tokenizers[folder]

    def encode_prompt(self, run: _Run) -> dict[str, np.ndarray]:
        """The UNet's conditioning, one row per UNet row ([negative x B, prompt x B] under CFG):
        every text encoder's states concatenated on the last axis (`encoder_hidden_states`), and
        for families with a pooled vector its `text_embeds`."""
        t0 = time.perf_counter()
        opts = run.job.opts
        family = self.manifest["family"]
        cfg = opts.guidance > 1.0
        if run.job.cascade[1:]:  # a cascade's stage II may guide when stage I does not
            from .cascade import upscale_settings

            cfg = cfg or upscale_settings(opts, self.manifest)[1] > 1.0
        texts = [opts.negative, run.job.text] if cfg else [run.job.text]
        if self.manifest.get("embeddings"):  # multi-vector textual-inversion tokens expand to n
            from ..fusion.embeddings import expand_prompt

            texts = [expand_prompt(t, self.manifest["embeddings"]) for t in texts]
        states, pooled = [], None
        for n, encoder in enumerate(family["text_encoders"]):
            t0 = t0 if n == 0 else time.perf_counter()
            stage = encoder["stage"]
            tok = self.tokenizer(encoder["tokenizer"], encoder.get("kind", "clip"))
            tokens = tok(texts)
            feeds = {"input_ids": tokens.ids}
            if encoder.get("mask"):
                feeds[encoder["mask"]] = tokens.mask
            if n == 0:
                for what, cut in zip(["negative prompt", "prompt"][-len(tokens.truncated):],
                                     tokens.truncated):
                    if cut:
                        run.warnings.append(f"{what} longer than {tok.max_length} tokens: "
                                            f"dropped {cut!r}")
                run.truncated = any(tokens.truncated)
            te = self._session(run, stage, self.manifest["graphs"][stage])
            run.log(f"[{stage}] holding {stage} on {te.provider} "
                    f"({te.load_seconds:.1f} s to load)")
            if run.observe:
                run.observe(stage, dict(feeds))
            names = [encoder["states"]] + ([encoder["pooled"]] if encoder.get("pooled") else [])
            outs = te.run(feeds, bound=self._bound_slots(run, stage, te), outputs=names)
            states.append(outs[0])
            if encoder.get("pooled"):
                pooled = outs[1]
            run.providers[stage] = te.provider
            del te  # a streamed run releases the session here: the next stage's weights load
            self._done(run, stage)
            self._timed(run, stage, t0)
        cond = {"encoder_hidden_states": np.concatenate(states, axis=-1)}
        if pooled is not None:
            cond["text_embeds"] = pooled
        if cfg and family.get("zero_empty_negative") and not opts.negative:
            # diffusers' SDXL pipelines: no negative prompt -> zero conditioning, not encoded ""
            cond = {k: np.concatenate([np.zeros_like(v[:1]), v[1:]]) for k, v in cond.items()}
        return {k: np.repeat(v, opts.batch, axis=0) for k, v in cond.items()}

    def scheduler(self, name: str):
        from .schedulers import make_scheduler

        if self._scheduler_config is None:
            self._scheduler_config = read_json_object(contained(
                self.folder, self.manifest["scheduler"]["config"], "scheduler.config"))
        return make_scheduler(name, self._scheduler_config)

    def initial_latents(self, run: _Run):
        """(latents, timesteps, scheduler): noise for txt2img, the noised init image for img2img."""
        job, opts = run.job, run.job.opts
        model = self.manifest["model"]
        f, c = model["vae_scale_factor"], model["latent_channels"]
        shape = (opts.batch, c, job.height // f, job.width // f)
        given = job.latents
        scheduler = self.scheduler(job.scheduler)
        scheduler.set_timesteps(opts.steps)
        if job.init is not None:
            timesteps = scheduler.img2img_timesteps(opts.steps, float(opts.strength))
            return self.encode_image(run, scheduler, timesteps, shape, given), timesteps, scheduler
        if given is not None:
            return given * np.float32(scheduler.init_noise_sigma), scheduler.timesteps, scheduler
        noise = np.concatenate([rng.standard_normal((1, *shape[1:]), dtype=np.float32)
                                for rng in run.rngs])
        return noise * np.float32(scheduler.init_noise_sigma), scheduler.timesteps, scheduler

    def encode_image(self, run: _Run, scheduler, timesteps, shape, given) -> np.ndarray:
        """img2img: the init image through vae_encoder, sampled and noised to the first step."""
        t0 = time.perf_counter()
        model = self.manifest["model"]
        stage = self.image_encoder
        enc = self._session(run, stage, self.manifest["graphs"][stage])
        run.log(f"[{stage}] holding {stage} on {enc.provider}")
        params = enc.run({"sample": run.job.init.astype(np.float32)})
        run.providers[stage] = enc.provider
        del enc
        self._done(run, stage)
        mean, logvar = np.split(params.astype(np.float64), 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        latents = np.empty(shape, np.float32)
        for i, rng in enumerate(run.rngs):
            sample = mean[0] + std[0] * rng.standard_normal(mean.shape[1:])
            clean = (model["scaling_factor"] * sample).astype(np.float32)[None]
            noise = given[i : i + 1] if given is not None else \
                rng.standard_normal(clean.shape, dtype=np.float32)
            latents[i] = scheduler.add_noise(clean, noise, timesteps[:1])[0]
        self._timed(run, stage, t0)
        return latents

    def denoise(self, run: _Run, latents, cond, timesteps, scheduler, *, stage: str | None = None,
                guidance: float | None = None, keep_variance: bool = False,
                concat: np.ndarray | None = None) -> np.ndarray:
        """The denoising loop; stops early on should_stop(). `cond`: encode_prompt's
        conditioning rows (and, for SDXL-style UNets, the size/crop ids are added here); for
        CFG, [negative x B, prompt x B], else the prompt's B rows (the prompt half is taken
        when the rows are there and this stage does not guide).

        Cascades (runtime/cascade.py) name the `stage` and its `guidance`; a UNet predicting
        twice the image's channels (IF's learned variance) has CFG mix the first half, and the
        prompt rows' second half is handed to the scheduler when `keep_variance`, else dropped.
        `concat` (IF stage II: the noised, upscaled stage I image) joins the model input on
        channels, before the scheduler's input scaling as diffusers does."""
        from .unet_chunks import ChunkedUNet

        t0 = time.perf_counter()
        opts, plan = run.job.opts, run.job.plan
        stage = stage or self.unet
        guidance = opts.guidance if guidance is None else guidance
        graph = self.manifest["graphs"][stage]
        cond = dict(cond)
        cfg = guidance > 1.0
        if not cfg and len(cond["encoder_hidden_states"]) == 2 * opts.batch:
            cond = {k: v[opts.batch:] for k, v in cond.items()}
        if self.manifest["family"]["conditioning"] == "text_time":
            # original size, crop top-left, target size: diffusers' defaults for a plain run
            h, w = run.job.height, run.job.width
            ids = np.array([h, w, 0, 0, h, w], np.float32)
            cond["time_ids"] = np.repeat(ids[None], len(cond["encoder_hidden_states"]), axis=0)
        bound = None
        if plan is not None and plan.unet == "chunks":  # streamed: weights go in at creation
            fused = {**run.adapters.slots.get(stage, {}), **run.adapters.swaps.get(stage, {})} \
                if run.adapters else None
            unet = ChunkedUNet(self.folder, stage, graph, self._provider(run, stage), plan.resident,
                               initializers=fused or None, cuda_mem_limit=plan.budget,
                               threads=self.threads)
            self.stats.sessions_created += len(plan.resident) or 1
            run.log(f"[{stage}] {plan.chunks} chunks on {unet.provider}, {len(plan.resident)} "
                    "resident")
            run.warnings += unet.warnings
        else:
            unet = self._session(run, stage, graph)
            bound = self._bound_slots(run, stage, unet)
            run.log(f"[{stage}] holding {stage} on {unet.provider} ({unet.load_seconds:.1f} s to "
                    "load)")
        run.providers[stage] = unet.provider
        multiple = graph.get("latent_multiple", self.manifest["model"]["unet_multiple"])
        rows = 2 * opts.batch if cfg else opts.batch
        micro = min(plan.micro, rows) if plan is not None else \
            (opts.batch if cfg and opts.cfg_split else rows)
        shape = latents.shape

        def unet_pass(feeds):
            if run.observe:
                run.observe(stage, feeds)
            if bound:
                return unet.run(feeds, multiple, bound=bound)
            return unet.run(feeds, multiple)

        channels = latents.shape[1]
        extra = None if concat is None else (np.concatenate([concat, concat]) if cfg else concat)
        for i, t in enumerate(timesteps):
            x = np.concatenate([latents, latents]) if cfg else latents
            if extra is not None:
                x = np.concatenate([x, extra], axis=1)
            x = scheduler.scale_model_input(x, t).astype(np.float32)
            eps = np.concatenate([
                unet_pass({"sample": x[s:s + micro],
                           "timestep": np.full(len(x[s:s + micro]), t, np.float32),
                           **{k: v[s:s + micro] for k, v in cond.items()}})
                for s in range(0, rows, micro)])
            variance = None
            if eps.shape[1] > channels:  # learned variance (IF): the prompt rows' second half
                variance = (np.split(eps, 2)[1] if cfg else eps)[:, channels:]
                eps = eps[:, :channels]
            if cfg:
                uncond, text = np.split(eps, 2)
                eps = uncond + np.float32(guidance) * (text - uncond)
            if variance is not None and keep_variance:
                eps = np.concatenate([eps, variance], axis=1)
            noise = None
            needs = getattr(scheduler, "needs_noise", None)
            if scheduler.stochastic and (needs is None or needs(t)):
                # euler-a, ddpm: fresh noise every step, from each image's seed
                noise = np.concatenate([rng.standard_normal((1, *shape[1:]), dtype=np.float32)
                                        for rng in run.rngs])
            latents = scheduler.step(eps.astype(np.float32), t, latents,
                                     noise=noise).astype(np.float32)
            run.progress(stage, i + 1, len(timesteps))
            stop = run.should_stop()
            if stop == "cancel":
                raise Cancelled("cancelled: the request's client went away")
            if stop == "interrupt" and i + 1 < len(timesteps):
                run.interrupted = True
                run.log(f"[{stage}] interrupted after step {i + 1} of {len(timesteps)}")
                break
        unet = bound = None  # a streamed run releases the session here (the closure holds them)
        self._done(run, stage)
        self._timed(run, stage, t0)
        if not np.isfinite(latents).all():
            raise SdcError("the denoising loop produced NaN/Inf latents (fp16 overflow?); try the "
                           "fp32 build or another scheduler")
        return latents

    def decode(self, run: _Run, latents) -> list:
        """Pixels [1, 3, H, W] per image (whole decoder or exact tiles, as planned)."""
        from .vae_decode import decode_latents

        t0 = time.perf_counter()
        model = self.manifest["model"]
        plan, opts = run.job.plan, run.job.opts
        z = latents / np.float32(model["scaling_factor"])
        tile = plan.vae_tile if plan is not None else opts.vae_tile
        if tile is None:
            from .planner import AUTO_TILE, auto_tile_above

            tile = AUTO_TILE if max(z.shape[2:]) > auto_tile_above(model) else 0
        stage = self.decoder
        if run.observe:
            run.observe(stage, {"latent_sample": z})

        def opener(graph, onnx_file=None, arena=True):
            return self._session(run, stage, graph, onnx_file, arena)

        pixels, run.providers[stage], warnings = decode_latents(
            self.folder, stage, self.manifest["graphs"][stage], z, model["vae_scale_factor"],
            tile, self._provider(run, stage), run.log, run.progress, opener=opener)
        self._done(run, stage)
        if run.observe and self.image_encoder:  # stacked for a caller's hook only
            run.observe(self.image_encoder,
                        {"sample": np.clip(np.concatenate(pixels), -1, 1).astype(np.float32)})
        run.warnings += warnings
        self._timed(run, stage, t0)
        return pixels


def _identity(path: Path) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_size, st.st_mtime_ns, st.st_ino)
