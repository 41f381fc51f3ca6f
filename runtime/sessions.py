"""One onnxruntime session per stage: provider choice, honest provider reporting, feed checks.

onnxruntime-gpu silently runs on CPU when CUDA libraries are missing while still calling itself a
GPU build, so after creating a session we read `get_providers()` and report what it *really* runs
on; `--provider cuda` that lands on CPU is an error, `auto` falls back with a warning.

Every feed is checked against the graph's schema in the manifest before running (names, dtypes,
ranks, fixed dims, and one value per symbolic dim across inputs), so a wrong shape is a one-line
error naming the input, not an ORT stack trace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SdcError
from .cpu import u8s8_saturates

PROVIDERS = ("auto", "cpu", "cuda")
_ORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


# A graph's CPU session level, from its manifest entry (`optimization`, default basic). A w8a8
# graph needs onnxruntime's QDQ fusions (extended and above) to compute in int8 at all.
LEVELS = ("basic", "all")


def apply_level(opts, name: str) -> None:
    """Set a CPU session's optimisation level `name` (LEVELS) on `opts`. At `all` (the w8a8
    graphs), on a CPU whose u8s8 kernels saturate (u8s8_saturates), it also asks for
    onnxruntime's x64 quantization precision mode, which turns the int8 weights to uint8 for the
    exact u8u8 kernels (Avx2WeightS8ToU8Transformer)."""
    import onnxruntime as ort

    if name not in LEVELS:
        raise SdcError(f"graph optimization {name!r}: expected one of {', '.join(LEVELS)}; "
                       "the build is newer than this sdc or damaged")
    opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[name]
    if name == "all" and u8s8_saturates():
        opts.add_session_config_entry("session.x64quantprecision", "1")


def resolve_providers(choice: str) -> list[str]:
    import onnxruntime as ort

    if choice not in PROVIDERS:
        raise SdcError(f"--provider {choice}: expected one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if choice == "cuda" and _ORT_NAMES["cuda"] not in available:
        raise SdcError("--provider cuda: this onnxruntime has no CUDA provider (available: "
                       f"{', '.join(available)}); install onnxruntime-gpu instead of onnxruntime")
    if choice == "cpu" or (choice == "auto" and _ORT_NAMES["cuda"] not in available):
        return [_ORT_NAMES["cpu"]]
    return [_ORT_NAMES["cuda"], _ORT_NAMES["cpu"]]


@dataclass
class StageSession:
    """A live session for one stage and what it really runs on."""

    stage: str
    graph: dict  # the manifest's entry for this graph
    session: object
    provider: str
    load_seconds: float
    warnings: list[str] = field(default_factory=list)
    # OrtValues handed to add_external_initializers: ORT reads them without copying, so they must
    # outlive the session
    keep: list = field(default_factory=list)

    def run(self, feeds: dict[str, np.ndarray], latent_multiple: int = 1,
            bound: dict | None = None, outputs: list[str] | None = None):
        """The graph's first output, or the list of `outputs` named. `bound` {slot initializer:
        OrtValue} overrides adapter slots for this run (an IOBinding: the values are not copied
        on CPU, and on CUDA they were copied to the device once, when the adapter was bound);
        empty: the base weights."""
        check_feeds(self.stage, self.graph, feeds, latent_multiple)
        names = outputs or [self.graph["outputs"][0]["name"]]
        if not bound:
            got = self.session.run(names, feeds)
        else:
            io = self.session.io_binding()
            for name, value in bound.items():
                io.bind_ortvalue_input(name, value)
            for name, arr in feeds.items():
                io.bind_cpu_input(name, np.ascontiguousarray(arr))
            for name in names:
                io.bind_output(name)
            self.session.run_with_iobinding(io)
            got = io.copy_outputs_to_cpu()
        return got if outputs else got[0]

    def slot_values(self, arrays: dict[str, np.ndarray]) -> dict:
        """OrtValues for `arrays` on this session's device, to pass as `run(bound=...)`."""
        import onnxruntime as ort

        device = "cuda" if self.provider == _ORT_NAMES["cuda"] else "cpu"
        return {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), device, 0)
                for name, a in arrays.items()}


def open_session(folder: Path, stage: str, graph: dict, provider: str = "auto",
                 onnx_file: str | None = None, arena: bool = True,
                 initializers: dict[str, np.ndarray] | None = None,
                 prepack: bool = True, cuda_mem_limit: int | None = None,
                 threads: int | None = None) -> StageSession:
    """`onnx_file` (relative to the build) defaults to the graph's own; `arena=False` turns ORT's
    CPU arena off, for graphs run many times at varying shapes next to other live sessions (the
    VAE decoder's segments: 26 arenas each holding its own peak summed to 7.8 GiB for one 512 px
    decode, 1.4 GiB without; measured). `initializers` replace external-data weights by name
    (LoRA swap): `add_external_initializers`, which checks names, shapes and dtypes and acts
    before graph optimisation; never `add_initializer`, which is silently ignored for weights
    behind a Transpose (FACTS.md). `prepack=False` skips MLAS weight pre-packing: for sessions
    created over and over (streamed UNet chunks) it cuts the SD1.5 UNet's creation from 4.5 to
    1.5 s at the same step time and peak (measured, 2 cores). `cuda_mem_limit` (a --vram-budget)
    caps the CUDA provider's arena (`gpu_mem_limit`) and grows it only as requested
    (`kSameAsRequested`) instead of doubling, so a budget is a hard device-side limit too."""
    import onnxruntime as ort

    wanted = resolve_providers(provider)
    if onnx_file is None:
        onnx_file = next(f for f in graph["files"] if f.endswith(".onnx"))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT's own warnings are about graph internals, not the user's input
    if wanted[0] == _ORT_NAMES["cpu"]:
        # On CPU the extended/layout optimisations cost ~10 s of session creation for the SD1.5
        # fp32 UNet and buy ~10 % step time (bench/README.md); basic keeps constant folding and
        # eliminations. A w8a8 graph records `optimization: all` (its QDQ units must fuse).
        apply_level(opts, graph.get("optimization", "basic"))
    # ORT's memory pattern pre-plans one block for a run's activations but allocates it on the
    # second run while the first run's arena is still held: SD1.5 UNet peak 6.6 -> 9.2 GiB from
    # the second step on, and slower steps. Off: 6.6 GiB steady (measured, 2 cores, fp32, 512²).
    opts.enable_mem_pattern = False
    opts.enable_cpu_mem_arena = arena
    if threads:  # a process sharing the machine (a Ray replica with 1 CPU): no oversubscription
        opts.intra_op_num_threads = threads
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    keep = override_initializers(opts, initializers)
    t0 = time.perf_counter()
    try:
        providers = wanted
        if cuda_mem_limit and wanted[0] == _ORT_NAMES["cuda"]:
            providers = [(wanted[0], {"gpu_mem_limit": str(int(cuda_mem_limit)),
                                      "arena_extend_strategy": "kSameAsRequested"}), *wanted[1:]]
        session = ort.InferenceSession(str(Path(folder) / onnx_file), opts, providers=providers)
    except Exception as e:  # noqa: BLE001 - ORT raises several internal types
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SdcError(f"{stage}: onnxruntime cannot load {onnx_file} ({msg}); run `sdc verify` "
                       "or rebuild the artifacts") from None
    actual = session.get_providers()[0]
    notes = []
    if wanted[0] != actual:
        if provider == "cuda":
            raise SdcError(f"{stage}: asked for CUDA but onnxruntime created the session on {actual} "
                           "(CUDA/cuDNN libraries missing?); use --provider cpu or fix the CUDA setup")
        notes.append(f"{stage}: CUDA unavailable at session creation, running on {actual}")
    return StageSession(stage, graph, session, actual, time.perf_counter() - t0, notes, keep)


def override_initializers(opts, arrays: dict[str, np.ndarray] | None) -> list:
    """Hand `arrays` to a session about to be created with `opts` in place of the external
    initializers of those names; returns the OrtValues, which must outlive the session (ORT reads
    them without copying)."""
    import onnxruntime as ort

    if not arrays:
        return []
    keep = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in arrays.values()]
    opts.add_external_initializers(list(arrays), keep)
    return keep


def free_memory() -> None:
    """Collect a just-dropped session and hand the freed heap back to the OS. Call it after the
    last reference to the session is gone (`del session; free_memory()`).

    Without the trim, glibc keeps the UNet's freed arena and the VAE decoder's allocations land on
    top of it: 9.3 GiB peak for a 512² SD1.5 run instead of the UNet's own 6.6 GiB (measured).
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def check_feeds(stage: str, graph: dict, feeds: dict[str, np.ndarray], latent_multiple: int = 1) -> None:
    """Raise SdcError unless `feeds` fit the graph's declared inputs."""
    want = {t["name"]: t for t in graph["inputs"]}
    if set(feeds) != set(want):
        raise SdcError(f"{stage}: feeds {sorted(feeds)} do not match the graph's inputs {sorted(want)}")
    bound: dict[str, tuple[int, str]] = {}
    for name, spec in want.items():
        arr = feeds[name]
        if arr.dtype != np.dtype(spec["dtype"]):
            raise SdcError(f"{stage}.{name}: dtype {arr.dtype}, graph expects {spec['dtype']}")
        if arr.ndim != len(spec["shape"]):
            raise SdcError(f"{stage}.{name}: shape {list(arr.shape)} has rank {arr.ndim}, graph "
                           f"expects {spec['shape']}")
        for axis, (size, dim) in enumerate(zip(arr.shape, spec["shape"])):
            if isinstance(dim, int):
                if size != dim:
                    raise SdcError(f"{stage}.{name}: axis {axis} is {size}, graph expects {dim} "
                                   f"(shape {spec['shape']})")
                continue
            if dim in bound and bound[dim][0] != size:
                raise SdcError(f"{stage}.{name}: {dim}={size} but {bound[dim][1]} has {dim}="
                               f"{bound[dim][0]}")
            bound.setdefault(dim, (size, name))
            if dim.startswith("latent_") and size % latent_multiple:
                raise SdcError(f"{stage}.{name}: {dim}={size} is not a multiple of {latent_multiple}")
