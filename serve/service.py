"""The local backend of the app: the builds (serve/models.py), one job queue (serve/jobs.py) and
the metrics, behind the interface the routes call (serve/app.py). A Ray Serve replica holds one
of these too (serve/ray_app.py): the queue there is the replica's own.

`run_request` is one A1111 request on the worker thread: n_iter runs of the Engine, seeds
S + k x batch_size for iteration k (A1111's), an interrupt ending the remaining iterations.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path

from .. import __version__
from ..errors import SdcError
from ..runtime.engine import Cancelled
from ..runtime.pipeline import GenerateOptions
from . import a1111
from .jobs import JobQueue
from .metrics import Metrics
from .models import Models

OPTION_NO_OPS = {"samples_format", "sd_checkpoint_hash"}  # accepted, change nothing


class Service:
    def __init__(self, cfg):
        from ..runtime.memory import parse_size

        self.cfg = cfg
        parse_size(cfg.lora_cache)  # a bad size fails at start, not at the first LoRA
        self.models = Models(cfg.artifacts, {"provider": cfg.provider,
                                             "vram_budget": cfg.vram_budget,
                                             "lora_cache": cfg.lora_cache,
                                             "lora_dir": cfg.lora_dir,
                                             "threads": cfg.threads,
                                             "stage_providers": cfg.stage_providers}, cfg.model)
        self.models.load()  # verified (every sha256) before the server answers /health
        self.jobs = JobQueue(cfg.max_queue)
        self.metrics = Metrics(self.jobs, self.models)

    # --- the work, on the worker thread ---------------------------------------------------------

    def run_request(self, req: a1111.Request, job) -> dict:
        try:
            return self._run_request(req, job)
        except SdcError as e:  # the server's own folders are not the client's business
            raise SdcError(self.redact(str(e))) from None

    def redact(self, text: str) -> str:
        """`text` with the --artifacts and --lora-dir paths replaced by their role."""
        for folder, name in ((self.cfg.lora_dir, "<lora-dir>"), (self.cfg.artifacts, "<artifacts>")):
            if folder is not None:
                for form in sorted({str(Path(folder).resolve()), str(folder)}, key=len,
                                   reverse=True):
                    text = text.replace(form, name)
        return text

    def _run_request(self, req: a1111.Request, job) -> dict:
        results = []
        with self.models.lock:
            model = self.models.lookup(req.model) if req.model else self.models.current
            engine = self.models.load(model)
            seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
            for k in range(req.n_iter):
                if job.interrupted and results:
                    break  # A1111's interrupt also ends the remaining iterations

                def progress(stage, i, n, k=k):
                    if stage == engine.unet:
                        job.steps = n * req.n_iter
                        job.step = k * n + i

                opts = GenerateOptions(
                    prompt=req.prompt, negative=req.negative, steps=req.steps,
                    guidance=req.guidance, seed=seed + k * req.batch, width=req.width,
                    height=req.height, scheduler=req.scheduler, batch=req.batch,
                    init_image=req.init_image, strength=req.strength)
                result = engine.generate(opts, progress=progress, should_stop=job.should_stop)
                self.metrics.observe(result)
                results.append(result)
        images = [a1111.encode_png(img) for r in results for img in r.images] \
            if req.send_images else []
        info = a1111.info(req, results, model.a1111(), f"sdc {__version__}")
        return {"images": images, "parameters": req.raw, "info": json.dumps(info)}

    def apply_options(self, body: dict) -> None:
        """All of `body` checked first, then applied: a bad key changes nothing."""
        with self.models.lock:
            model = body.get("sd_model_checkpoint")
            if model is not None and not isinstance(model, str):
                raise SdcError("sd_model_checkpoint: expected a model title")
            for key, value in body.items():
                if key != "sd_model_checkpoint":
                    check_option(key, value)
            if model is not None:
                self.models.select(model)

    # --- the routes' interface (serve/ray_app.py's RayBackend has the same) -------------------

    @property
    def requests_counter(self):
        return self.metrics.requests

    async def generate(self, request, kind: str, body) -> dict:
        req = a1111.parse(body, kind, self.cfg.limits)
        return await self.run(request, kind, lambda job: self.run_request(req, job))

    async def set_options(self, request, body: dict) -> None:
        return await self.run(request, "options", lambda job: self.apply_options(body))

    async def run(self, request, kind: str, fn, on_cancel=None):
        """Queue `fn` and wait for it. A client that goes away (`request.is_disconnected()`) or
        a cancelled caller cancels its job: the worker stops it at its next step."""
        job = self.jobs.submit(kind, fn)
        fut = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=0.2)
                if done:
                    return fut.result()
                if request is not None and await request.is_disconnected():
                    job.cancelled = True
                    await _settle(fut)
                    return gone()
        except asyncio.CancelledError:  # the caller went away (a Ray request cancelled)
            job.cancelled = True
            raise

    def sd_models(self) -> list[dict]:
        return [m.a1111() for m in self.models.available.values()]

    def refresh_models(self) -> None:
        self.models.refresh()

    def options(self) -> dict:
        return options_of(self.models.current)

    async def interrupt(self) -> None:
        self.jobs.interrupt()

    def health(self) -> dict:
        return {"model": self.models.current.title, "queue_depth": self.jobs.depth}

    async def metrics_text(self) -> bytes:
        return self.metrics.render()

    def progress(self) -> dict:
        job = self.jobs.current
        if job is None:
            return idle_progress(self.jobs.depth)
        elapsed = time.time() - (job.started or time.time())
        frac = job.fraction
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        return {"progress": round(frac, 4), "eta_relative": round(eta, 2), "state": {
            "skipped": False, "interrupted": job.interrupted, "stopping_generation": False,
            "job": job.id, "job_count": self.jobs.depth,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
            "job_no": 0, "sampling_step": job.step, "sampling_steps": job.steps},
            "current_image": None, "textinfo": f"{job.kind}: step {job.step} of {job.steps}",
            "current_task": job.id}


async def _settle(fut) -> None:
    try:
        await fut
    except (Cancelled, asyncio.CancelledError, Exception):  # noqa: BLE001 - nobody to tell
        pass


def gone():
    from fastapi.responses import Response

    return Response(status_code=499)  # the client closed the connection: nobody reads this


def check_option(key: str, value) -> None:
    """Options other than the model: accepted at values that change nothing, else refused."""
    if key in a1111.OVERRIDES_NO_OP:
        if value not in a1111.OVERRIDES_NO_OP[key]:
            raise a1111.refuse(key, value, "a setting that changes the image")
    elif key not in OPTION_NO_OPS:
        raise a1111.refuse(key, value, "a setting sdc serve does not have")


def idle_progress(depth: int) -> dict:
    return {"progress": 0.0, "eta_relative": 0.0, "state": {
        "skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
        "job_count": depth, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
        "sampling_steps": 0}, "current_image": None, "textinfo": None, "current_task": None}


def options_of(model) -> dict:
    return {"sd_model_checkpoint": model.title, "sd_checkpoint_hash": model.sha256,
            "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "samples_format": "png",
            "eta_noise_seed_delta": 0}


def list_loras(lora_dir) -> list[dict]:
    """A1111's /sdapi/v1/loras for `lora_dir`: name, alias, path inside the folder, metadata,
    trigger words."""
    from ..fusion.lora import triggers
    from ..fusion.safetensors_file import read_safetensors
    from ..runtime.prompt_loras import lora_index

    if lora_dir is None:
        return []
    root = Path(lora_dir).resolve()
    out = []
    for name, path in sorted(lora_index(root).items()):
        if path is None:
            continue  # ambiguous name: not offered
        entry = {"name": name, "alias": name, "path": path.resolve().relative_to(root).as_posix()}
        try:
            meta = dict(read_safetensors(path, f"LoRA {name}", allow_empty=True).metadata)
            entry["metadata"] = meta
            entry["triggers"] = triggers(meta, f"LoRA {name}")
        except SdcError as e:  # listed with the reason: the page can show it
            entry["metadata"], entry["triggers"], entry["error"] = {}, [], str(e)
        out.append(entry)
    return out
