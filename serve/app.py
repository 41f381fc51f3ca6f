"""The FastAPI app of `sdc serve`: AUTOMATIC1111's API routes over one warm Engine.

Routes (A1111-compatible): POST /sdapi/v1/txt2img, POST /sdapi/v1/img2img, GET /sdapi/v1/sd-models,
GET/POST /sdapi/v1/options, GET /sdapi/v1/samplers, GET /sdapi/v1/schedulers, GET /sdapi/v1/loras,
GET /sdapi/v1/progress, POST /sdapi/v1/interrupt, GET /sdapi/v1/scripts, POST
/sdapi/v1/refresh-checkpoints, POST /sdapi/v1/refresh-loras; and GET /health, GET /metrics,
GET / (the web page).

Safety: the CLI binds 127.0.0.1 unless told otherwise, and refuses a non-loopback host without
--api-auth (HTTP basic auth on every route but /health). No request names a file: models and LoRAs
are looked up by name (serve/models.py, runtime/prompt_loras.py). Bodies above --max-body are
refused before they are read in full; steps, size and images per request are bounded
(a1111.Limits). Every error is one JSON line {"error", "detail"}: 422 for a bad request, 503 with
Retry-After when the queue is full, 401 without credentials; an unexpected failure is a 500 that
names its type and is logged with its traceback on the server, never sent to the client.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request  # module level: route annotations are resolved in this namespace

from .. import __version__
from ..errors import SdcError
from . import a1111
from .jobs import QueueFull
from .service import list_loras

log = logging.getLogger("sdc.serve")
STATIC = Path(__file__).parent / "static"
MAX_BODY = 32 * 2**20  # bytes: a 4096 x 4096 PNG init image in base64 fits


@dataclass
class ServeConfig:
    artifacts: Path
    lora_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    api_auth: str | None = None  # "USER:PASS"
    max_queue: int = 8  # requests waiting beyond the one running; then 503
    vram_budget: str | None = None
    lora_cache: str = "2GiB"
    provider: str = "auto"
    model: str | None = None  # the model loaded first (name or title); None: the first
    max_body: int = MAX_BODY
    limits: a1111.Limits = field(default_factory=a1111.Limits)
    threads: int | None = None  # onnxruntime threads per session (None: all cores)
    stage_providers: str | None = None  # "vae_decoder=cpu": per-stage providers over `provider`


def check_config(cfg: ServeConfig) -> None:
    """Refuse what would be unsafe or cannot work, before anything is loaded."""
    if cfg.api_auth is not None:
        user, sep, password = cfg.api_auth.partition(":")
        if not sep or not user or not password:
            raise SdcError("--api-auth: expected USER:PASSWORD (both non-empty)")
    if not _loopback(cfg.host) and cfg.api_auth is None:
        raise SdcError(f"--host {cfg.host}: serving beyond this machine needs --api-auth "
                       "USER:PASSWORD (anyone who can reach the port could use it otherwise)")
    if not 0 <= cfg.port <= 65535:
        raise SdcError(f"--port {cfg.port}: expected 0..65535")
    if cfg.threads is not None and cfg.threads < 1:
        raise SdcError(f"--threads {cfg.threads}: expected 1 or more")
    if cfg.max_queue < 1:
        raise SdcError(f"--max-queue {cfg.max_queue}: expected 1 or more (requests that may "
                       "wait behind the running one)")
    if cfg.lora_dir is not None and not Path(cfg.lora_dir).is_dir():
        raise SdcError(f"--lora-dir {cfg.lora_dir}: not a folder; expected a folder of LoRA "
                       ".safetensors files")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(cfg: ServeConfig, backend=None):
    """The app over `backend`: a local Service (one Engine, one queue) by default, or Ray Serve
    replicas (serve/ray_app.py). Both answer the same routes the same way."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    check_config(cfg)
    if backend is None:
        from .service import Service

        backend = Service(cfg)
    app = FastAPI(title="sdc serve", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.backend = backend

    def error(status: int, kind: str, detail: str, headers=None) -> JSONResponse:
        return JSONResponse({"error": kind, "detail": " ".join(str(detail).split())[:2000]},
                            status_code=status, headers=headers)

    @app.exception_handler(SdcError)
    async def _sdc_error(request, exc):
        return error(422, "Unprocessable", str(exc))

    @app.exception_handler(QueueFull)
    async def _full(request, exc):
        return error(503, "QueueFull", str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(422, "Unprocessable", f"{where or 'body'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return error(exc.status_code, "HTTPError", exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        log.exception("internal error on %s", request.url.path)
        return error(500, "Internal", f"internal error ({type(exc).__name__}); the server log "
                     "has the details")

    app.add_middleware(_BodyLimit, limit=cfg.max_body)
    if cfg.api_auth:
        app.add_middleware(_BasicAuth, credentials=cfg.api_auth, open_paths={"/health"})
    app.add_middleware(_Counted, counter=backend.requests_counter, app_routes=app.routes)

    async def body_of(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SdcError(f"the body is not JSON ({e.msg if hasattr(e, 'msg') else e})") from None
        except ValueError:  # e.g. an integer beyond Python's 4300-digit conversion limit
            raise SdcError("the body holds a number JSON cannot be read as here (too many "
                           "digits); expected an A1111 request object") from None
        except RecursionError:  # `[[[[...` nested beyond the parser's stack
            raise SdcError("the body is JSON nested too deeply; expected an A1111 request "
                           "object") from None

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await backend.generate(request, "txt2img", await body_of(request))

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await backend.generate(request, "img2img", await body_of(request))

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return backend.sd_models()

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        backend.refresh_models()
        return None

    @app.get("/sdapi/v1/options")
    async def get_options():
        return backend.options()

    @app.post("/sdapi/v1/options")
    async def post_options(request: Request):
        body = await body_of(request)
        if not isinstance(body, dict):
            raise SdcError("expected a JSON object of options")
        return await backend.set_options(request, body)

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": name, "aliases": [sdc], "options": {}}
                for name, sdc in a1111.SAMPLERS.items()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None,
                 "default_rho": -1, "need_inner_model": False},
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                 "need_inner_model": False}]

    @app.get("/sdapi/v1/loras")
    async def loras():
        return await asyncio.to_thread(list_loras, cfg.lora_dir)

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        return None  # the folder is read on every /loras and every <lora:...> lookup

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/progress")
    async def progress():
        return backend.progress()

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        await backend.interrupt()
        return {}

    @app.get("/health")
    async def health():
        return {"status": "ok", **backend.health(), "version": __version__}

    @app.get("/metrics")
    async def metrics():
        return Response(await backend.metrics_text(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class _Counted:
    """Counts responses by route and status (pure ASGI: nothing between a route and its client's
    disconnect notice). Paths outside the app's routes count as "other"."""

    def __init__(self, app, counter, app_routes):
        self.app, self.counter, self.routes = app, counter, app_routes
        self._known: set | None = None  # route paths, read once (routes exist by then)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if self._known is None:
                self._known = {getattr(r, "path", None) for r in self.routes}
            path = scope.get("path", "")
            self.counter.labels(path if path in self._known else "other",
                                str(status["code"])).inc()


class _BodyLimit:
    """Refuse request bodies above `limit` bytes, by Content-Length or while they stream in,
    before a route reads them (pure ASGI, so nothing is buffered beyond the limit)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send, declared.decode(errors="replace"))
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks = None  # disconnected before the body ended
                break
            total += len(message.get("body", b""))
            if total > self.limit:
                return await self._refuse(send, f"more than {self.limit}")
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed and chunks is not None:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send, size: str):
        body = json.dumps({"error": "Unprocessable", "detail": f"request body of {size} bytes "
                           f"is over the limit of {self.limit} bytes (--max-body)"}).encode()
        await send({"type": "http.response.start", "status": 422,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _BasicAuth:
    """HTTP basic auth on every path but `open_paths` (pure ASGI; constant-time comparison)."""

    def __init__(self, app, credentials: str, open_paths: set[str]):
        self.app, self.open_paths = app, open_paths
        self.expected = b"Basic " + base64.b64encode(credentials.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        body = b'{"error": "Unauthorized", "detail": "this server needs HTTP basic auth (--api-auth)"}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", b'Basic realm="sdc"'),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
