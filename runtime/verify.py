"""`sdc verify`: every file against the manifest (size, sha256) and each graph's declared schema.

Schema: the ONNX graph's own input/output names and element types, as onnxruntime reads them,
must equal the manifest's. Runs without torch.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SdcError
from .manifest import load_manifest, verify_files

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32"}


def graph_schema_problems(folder: Path, stage: str, graph: dict) -> list[str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    onnx_file = next(f for f in graph["files"] if f.endswith(".onnx"))
    try:
        session = ort.InferenceSession(str(folder / onnx_file), opts,
                                       providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own types; report one line
        return [f"{stage}: onnxruntime cannot load {onnx_file} ({str(e).splitlines()[0][:120]})"]
    problems = []
    for kind, actual in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        want = [(t["name"], t["dtype"]) for t in graph[kind]]
        have = [(a.name, _ORT_TYPES.get(a.type, a.type)) for a in actual]
        if want != have:
            problems.append(f"{stage}: graph {kind} {have} != manifest {want}")
    return problems


def verify(folder: Path, hashes: bool = True) -> list[str]:
    """Report lines on success; SdcError listing the problems otherwise."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    problems = verify_files(folder, manifest, hashes=hashes)
    if not problems:
        for stage, graph in manifest["graphs"].items():
            problems += graph_schema_problems(folder, stage, graph)
    if problems:
        raise SdcError(f"{folder}: {len(problems)} problem(s): " + "; ".join(problems[:5])
                       + ("; ..." if len(problems) > 5 else "") + " — rebuild with `sdc build --force`")
    n = len(manifest["files"])
    lines = [f"{folder}: {n} files {'hashed' if hashes else 'sized'} and match the manifest; "
             f"{len(manifest['graphs'])} graph schemas match"]
    if note := layout_note(manifest):
        lines.append(note)
    return lines


# The layout from which each model folder holds its component's config.json (export/build.py).
CONFIGS_LAYOUT = 4


def layout_note(manifest: dict) -> str | None:
    """What an older build lacks, or None: `sdc verify` and `sdc inspect` say it."""
    if manifest.get("layout", 0) < CONFIGS_LAYOUT:
        return ("note: built by an older sdc, without each model folder's config.json: sdc runs it, "
                "but Optimum's ORTStableDiffusionPipeline cannot load it; rebuild with "
                "`sdc build --force` (or `sdc build --from` of a rebuilt base)")
    return None
