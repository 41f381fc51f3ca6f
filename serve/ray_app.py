"""`sdc serve --ray`: the same A1111-compatible app as a Ray Serve application.

  ingress   one replica running serve/app.py's FastAPI app over a RayBackend: it validates each
            request (422s never leave it), names the request's adapter set, and forwards it to...
  engine    N replicas (or autoscaled MIN..MAX), each one serve/service.py Service: an Engine that
            verified its build's hashes before it could become healthy, its own queue and
            adapter cache, under its own --vram-budget, with `ray_actor_options` CPUs/GPUs.

Routing, autoscaling (`target_ongoing_requests`, up/downscale delays), health checks and replica
restarts are Ray Serve's own. Adapters are multiplexed with Ray's model multiplexing: a request's
adapter set (its `<lora:NAME:WEIGHT>` tags, in order) is its multiplexed model id, so Ray routes it
to a replica that already holds that set fused (LoRAX's idea on an existing engine). Each answer
says which replica served it and whether its adapter set was already cached there
(`info.sdc.replica`, `info.sdc.adapter_cache`); the ingress counts hits per replica in /metrics.

Builds are shared by path: every replica opens the same --artifacts folder (one machine, or a
filesystem every node mounts at that path). A replica whose build fails verification raises in its
constructor and never becomes healthy; its health check fails when a file changes under it, and
the replacement replica verifies from scratch.

What differs from the single server: the current model (options.sd_model_checkpoint) is the
ingress' and travels with each request, so replicas switch as requests need; /progress reports
the requests in flight, not a step count (steps happen on replicas); interrupt is refused (it
would have to reach the one replica running the request).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, replace

from ..errors import SdcError
from . import a1111
from .jobs import QueueFull
from .service import check_option, gone, idle_progress, options_of


@dataclass
class RayOptions:
    replicas: int = 1  # fixed replica count (ignored with autoscale)
    autoscale: tuple[int, int] | None = None  # (min, max) replicas
    address: str | None = None  # an existing Ray cluster; None: start one on this machine
    target_ongoing: float = 1.0  # requests per replica the autoscaler aims at
    upscale_delay: float = 30.0  # seconds of demand before a replica is added
    downscale_delay: float = 600.0  # seconds idle before one is removed
    look_back: float = 30.0  # seconds of load the autoscaler averages over
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    multiplex: bool = True  # route by adapter set (off: any replica; for comparison)
    adapters_per_replica: int = 4  # adapter sets Ray tracks per replica (max_num_models_per_replica)
    health_period: float = 10.0  # seconds between replica health checks


def adapter_id(prompt: str) -> str:
    """The multiplexed model id of a prompt's adapter set: "" without LoRA tags."""
    from ..runtime.prompt_loras import split_prompt

    return "|".join(f"{t.name}:{t.weight:g}" for t in split_prompt(prompt)[1])


def parse_autoscale(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        lo_n, hi_n = int(lo), int(hi)
    except ValueError:
        lo_n = hi_n = -1
    if not sep or not 0 <= lo_n <= hi_n or hi_n < 1:
        raise SdcError(f"--autoscale {text}: expected MIN:MAX replicas with 0 <= MIN <= MAX, MAX >= 1")
    return lo_n, hi_n


# --- the engine replicas ------------------------------------------------------------------------

def engine_deployment(cfg, ropts: RayOptions):
    """The engine deployment's class (made here: the multiplexing bound is a decorator argument)."""
    from ray import serve

    class EngineReplica:
        def __init__(self, cfg):
            from .service import Service

            self.service = Service(cfg)  # loads and verifies every sha256, or raises: unhealthy
            try:
                self.replica = serve.get_replica_context().replica_tag
            except Exception:  # noqa: BLE001 - outside Ray (unit use)
                self.replica = f"pid-{os.getpid()}"

        def check_health(self) -> None:
            engine = self.service.models.engine
            changed = engine.changed_files() if engine is not None else []
            if changed:
                raise RuntimeError(f"build files changed since verification: {changed[:3]}")

        @serve.multiplexed(max_num_models_per_replica=ropts.adapters_per_replica)
        async def _adapter_set(self, adapter: str) -> str:
            return adapter  # fused by the request itself; Ray tracks which replica holds what

        async def generate(self, kind: str, body: dict) -> dict:
            adapter = serve.get_multiplexed_model_id()
            if adapter:
                await self._adapter_set(adapter)
            try:
                req = a1111.parse(body, kind, self.service.cfg.limits)
                cached = self._cached(req.prompt)
                out = await self.service.run(None, kind,
                                             lambda job: self.service.run_request(req, job))
            except SdcError as e:  # crosses the process boundary as data, not a traceback
                return {"__error__": "SdcError", "detail": str(e)}
            except QueueFull as e:
                return {"__error__": "QueueFull", "detail": str(e), "retry_after": e.retry_after}
            info = json.loads(out["info"])
            info["sdc"].update(replica=self.replica, adapter_cache=cached)
            return {**out, "info": json.dumps(info)}

        def _cached(self, prompt: str) -> str | None:
            """"hit" when this replica already holds the prompt's adapter set, else "miss"."""
            from ..runtime.prompt_loras import resolve_tags, split_prompt

            engine = self.service.models.engine
            specs = resolve_tags(split_prompt(prompt)[1], self.service.cfg.lora_dir)
            if not specs:
                return None
            return "hit" if engine.adapters.key(specs) in engine.adapters.entries else "miss"

        def stats(self) -> dict:
            e = self.service.models.engine
            return {"replica": self.replica, "hits": e.adapters.stats.hits,
                    "misses": e.adapters.stats.misses, "pid": os.getpid()}

    options = dict(name="engine", max_ongoing_requests=cfg.max_queue + 1,
                   ray_actor_options={"num_cpus": ropts.replica_cpus,
                                      "num_gpus": ropts.replica_gpus},
                   health_check_period_s=ropts.health_period, health_check_timeout_s=30,
                   # a replica whose build fails verification fails the same way every time:
                   # a few tries, then the deployment is reported failed (Ray's default is 20)
                   max_constructor_retry_count=3)
    if ropts.autoscale:
        lo, hi = ropts.autoscale
        options["autoscaling_config"] = {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
            "target_ongoing_requests": ropts.target_ongoing,
            "upscale_delay_s": ropts.upscale_delay, "downscale_delay_s": ropts.downscale_delay,
            "look_back_period_s": ropts.look_back}
    else:
        options["num_replicas"] = ropts.replicas
    return serve.deployment(**options)(EngineReplica)


# --- the ingress --------------------------------------------------------------------------------

class RayBackend:
    """The app's backend on the ingress: requests go to the engine replicas through a handle."""

    def __init__(self, cfg, ropts: RayOptions, handle):
        from prometheus_client import CollectorRegistry, Counter

        from .models import find_models

        self.cfg, self.ropts, self.handle = cfg, ropts, handle
        self.available = find_models(cfg.artifacts)
        self.current = self._lookup(cfg.model) if cfg.model else \
            self.available[sorted(self.available)[0]]
        self.inflight = 0
        self.registry = CollectorRegistry()
        self.requests_counter = Counter("sdc_requests", "HTTP requests answered",
                                        ["route", "status"], registry=self.registry)
        self.adapter_cache = Counter("sdc_replica_adapter_cache", "Requests with adapters by "
                                     "replica and whether their set was cached there",
                                     ["replica", "result"], registry=self.registry)

    def _lookup(self, name: str):
        for m in self.available.values():
            if name in (m.title, m.name):
                return m
        names = ", ".join(m.title for m in self.available.values())
        raise SdcError(f"sd_model_checkpoint={name!r}: no such model (available: {names})")

    async def generate(self, request, kind: str, body) -> dict:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        req = a1111.parse(body, kind, self.cfg.limits)  # a bad request never leaves the ingress
        if req.model:
            self._lookup(req.model)
        else:  # the ingress' current model travels with the request
            body = {**body, "override_settings": {**(body.get("override_settings") or {}),
                                                  "sd_model_checkpoint": self.current.title}}
        adapter = adapter_id(req.prompt) if self.ropts.multiplex else ""
        handle = self.handle.options(multiplexed_model_id=adapter) if adapter else self.handle
        self.inflight += 1
        try:
            response = handle.generate.remote(kind, body)
            task = asyncio.ensure_future(_resolve(response))
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.2)
                if done:
                    break
                if await request.is_disconnected():
                    response.cancel()
                    task.cancel()
                    return gone()
            out = task.result()
        except BackPressureError:
            raise QueueFull(1, self.inflight) from None
        except (RayActorError, DeploymentUnavailableError) as e:  # a replica died mid-request
            raise QueueFull(1, self.inflight) from e  # 503 + Retry-After: the client retries
        finally:
            self.inflight -= 1
        if "__error__" in out:
            if out["__error__"] == "QueueFull":
                raise QueueFull(out["retry_after"], self.inflight)
            raise SdcError(out["detail"])
        sdc = json.loads(out["info"])["sdc"]
        if sdc.get("adapter_cache"):
            self.adapter_cache.labels(sdc["replica"], sdc["adapter_cache"]).inc()
        return out

    async def set_options(self, request, body: dict) -> None:
        for key, value in body.items():
            if key == "sd_model_checkpoint":
                if not isinstance(value, str):
                    raise SdcError("sd_model_checkpoint: expected a model title")
                self.current = self._lookup(value)  # replicas load it with their next request
            else:
                check_option(key, value)

    def sd_models(self) -> list[dict]:
        return [m.a1111() for m in self.available.values()]

    def refresh_models(self) -> None:
        from .models import find_models

        self.available = find_models(self.cfg.artifacts)

    def options(self) -> dict:
        return options_of(self.current)

    async def interrupt(self) -> None:
        raise SdcError("interrupt: not available with --ray (the request runs on one of several "
                       "replicas); close the request's connection to cancel it instead")

    def progress(self) -> dict:
        return idle_progress(self.inflight)

    def health(self) -> dict:
        return {"model": self.current.title, "queue_depth": self.inflight, "ray": True}

    async def metrics_text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


async def _resolve(response):
    return await response


def ingress_deployment(cfg, ropts: RayOptions):
    from ray import serve

    @serve.deployment(name="ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=1000)
    @serve.ingress()
    class Ingress:
        def __init__(self, engines, cfg, ropts):
            self.engines, self.cfg, self.ropts = engines, cfg, ropts

        def __serve_build_asgi_app__(self):
            from .app import create_app

            return create_app(self.cfg, RayBackend(self.cfg, self.ropts, self.engines))

    return Ingress


def application(cfg, ropts: RayOptions):
    """The Ray Serve application: the ingress bound to the engine deployment."""
    from .app import check_config

    check_config(cfg)
    # replicas serve no HTTP themselves; each runs onnxruntime on the CPUs Ray gives it
    threads = cfg.threads or (max(1, int(ropts.replica_cpus)) if ropts.replica_cpus >= 1 else None)
    replica_cfg = replace(cfg, host="127.0.0.1", threads=threads)
    engines = engine_deployment(replica_cfg, ropts).bind(replica_cfg)
    return ingress_deployment(cfg, ropts).bind(engines, cfg, ropts)


def app_builder(args: dict):
    """`serve run sdc.serve.ray_app:app_builder artifacts=DIR [lora_dir=DIR] [replicas=2]
    [autoscale=1:4] [max_queue=8] [vram_budget=4GiB] [lora_cache=2GiB] [provider=cuda]
    [replica_cpus=1] [replica_gpus=1]`: the same application from a Ray Serve config."""
    from pathlib import Path

    from .app import ServeConfig

    known = {"artifacts", "lora_dir", "replicas", "autoscale", "max_queue", "vram_budget",
             "lora_cache", "provider", "replica_cpus", "replica_gpus", "model", "api_auth",
             "target_ongoing", "upscale_delay", "downscale_delay", "multiplex"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise SdcError(f"sdc Ray app: unknown argument(s) {', '.join(unknown)}; expected "
                       f"{', '.join(sorted(known))}")
    if "artifacts" not in args:
        raise SdcError("sdc Ray app: artifacts=DIR is required")
    cfg = ServeConfig(Path(args["artifacts"]),
                      Path(args["lora_dir"]) if args.get("lora_dir") else None,
                      api_auth=args.get("api_auth"),
                      max_queue=int(args.get("max_queue", 8)),
                      vram_budget=args.get("vram_budget"),
                      lora_cache=args.get("lora_cache", "2GiB"),
                      provider=args.get("provider", "auto"), model=args.get("model"))
    ropts = RayOptions(
        replicas=int(args.get("replicas", 1)),
        autoscale=parse_autoscale(args["autoscale"]) if args.get("autoscale") else None,
        target_ongoing=float(args.get("target_ongoing", 1.0)),
        upscale_delay=float(args.get("upscale_delay", 30.0)),
        downscale_delay=float(args.get("downscale_delay", 600.0)),
        replica_cpus=float(args.get("replica_cpus", 1.0)),
        replica_gpus=float(args.get("replica_gpus", 0.0)),
        multiplex=str(args.get("multiplex", "true")).lower() not in ("0", "false", "no"))
    return application(cfg, ropts)


def run(cfg, ropts: RayOptions, log=print) -> None:
    """Start (or join) a Ray cluster, deploy, serve until interrupted, then shut down."""
    import signal
    import threading

    import ray
    from ray import serve

    if ropts.address:
        ray.init(address=ropts.address, logging_level="warning")
    else:  # a local cluster on this machine, bound to loopback
        ray.init(include_dashboard=False, logging_level="warning", _node_ip_address="127.0.0.1")
    # after ray.init, which installs its own fatal-signal handlers (SIGTERM would abort): from
    # here a signal, even during deployment, shuts Serve and the cluster down in order
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(application(cfg, ropts), name="sdc", route_prefix="/", blocking=False)
        log(f"sdc serve --ray: http://{cfg.host}:{cfg.port}/ ({ropts.autoscale or ropts.replicas} "
            "engine replica(s))")
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
