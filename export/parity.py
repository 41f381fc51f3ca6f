"""The parity gate: every exported graph must reproduce its torch module, or the build fails.

References always come from the fp32 torch module (computed before any fp16 cast), at the spec's
parity cases (a square batch-2 case and a non-square batch-1 case, so dynamic axes are exercised).
Metrics and thresholds:
  fp32 graphs  max_rel = max|onnx - torch| / max|torch| <= spec.fp32_max_rel (1e-4). The exporter's
               own noise is ~1e-6 (op reordering); 1e-4 leaves two orders of margin while still
               catching a wrong op, a wrong weight or a broken dynamic axis (errors of order 1).
  fp16 graphs  PSNR = 20 log10((max - min of torch) / RMSE) >= spec.fp16_min_psnr (35 dB, the gate
               Apple's Core ML conversion uses). Half precision alone costs ~60 dB of headroom on
               these graphs, so 35 dB fails on real damage (overflow, NaN, a wrong layer) only.
Non-finite outputs always fail. Results go into the manifest whether or not they pass.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import ParityError
from .memory import PeakRss
from ..families.graph_spec import GraphSpec, ModelDims


def parity_cases(spec: GraphSpec, dims: ModelDims) -> dict[str, dict[str, np.ndarray]]:
    cases = spec.case_dims(dims)
    return {name: spec.dummy_inputs(dims, cases[name], seed=i + 1)
            for i, name in enumerate(("square", "non_square"))}


def torch_references(graph, spec: GraphSpec, feeds_by_case: dict) -> dict[str, np.ndarray]:
    """Run the (fp32) wrapped torch module on every parity case: one array per case, or a tuple
    of arrays (in the spec's output order) for a graph with several outputs."""
    import torch

    refs = {}
    with torch.no_grad():
        for case, feeds in feeds_by_case.items():
            args = [torch.from_numpy(feeds[t.name]) for t in spec.inputs]
            out = graph(*args)
            refs[case] = (tuple(o.float().numpy() for o in out) if isinstance(out, tuple)
                          else out.float().numpy())
    return refs


def compare_outputs(ref, outs: list, graph_precision: str, spec: GraphSpec) -> dict:
    """`compare` over every output of a graph; the worst one is the case's result."""
    refs = ref if isinstance(ref, tuple) else (ref,)
    results = [compare(r, o, graph_precision, spec) for r, o in zip(refs, outs)]
    failed = [r for r in results if not r["passed"]]
    if failed or len(results) == 1:
        return (failed or results)[0]
    values = [r["value"] for r in results]
    return {"value": max(values) if graph_precision == "fp32" else min(values), "passed": True}


def compare(ref: np.ndarray, out: np.ndarray, graph_precision: str, spec: GraphSpec) -> dict:
    if out.shape != ref.shape:
        return {"value": None, "passed": False, "detail": f"shape {out.shape} != torch {ref.shape}"}
    if not np.isfinite(out).all():
        return {"value": None, "passed": False, "detail": "non-finite values in ONNX output"}
    diff = out.astype(np.float64) - ref.astype(np.float64)
    if graph_precision == "fp32":
        value = float(np.abs(diff).max() / max(np.abs(ref).max(), 1e-12))
        return {"value": value, "passed": value <= spec.fp32_max_rel}
    rmse = math.sqrt(float(np.mean(diff**2)))
    peak = float(ref.max() - ref.min())
    value = float("inf") if rmse == 0 else 20 * math.log10(max(peak, 1e-12) / rmse)
    return {"value": value, "passed": value >= spec.fp16_min_psnr}


def check_graph(spec: GraphSpec, onnx_path: Path, graph_precision: str,
                feeds_by_case: dict, refs: dict) -> tuple[dict, dict]:
    """Run the ONNX graph in onnxruntime (CPU) on every case; raise ParityError on any failure.

    Returns (parity report, measured memory of the ORT session) for the manifest."""
    import onnxruntime as ort

    metric, threshold = (("max_rel", spec.fp32_max_rel) if graph_precision == "fp32"
                         else ("psnr_db", spec.fp16_min_psnr))
    results = []
    with PeakRss() as peak:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if graph_precision == "fp16":
            # ORT's CPU provider runs fp16 graphs through inserted Casts, and its constant folding
            # then materialises an fp32 copy of every weight at load: 5.7 GiB peak for the SD1.5
            # UNet vs 3.7 GiB unoptimised (measured). Parity is about the graph's numbers, which
            # optimisation must not change, so the gate skips it and the build's peak stays low.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        for case, feeds in feeds_by_case.items():
            outs = session.run([t.name for t in spec.outputs], feeds)
            res = compare_outputs(refs[case], outs, graph_precision, spec)
            shape = {t.name: list(feeds[t.name].shape) for t in spec.inputs}
            results.append({"case": case, "input_shapes": shape, **res})
        del session
    worst = [r["value"] for r in results if r["value"] is not None]
    passed = all(r["passed"] for r in results)
    report = {
        "metric": metric, "threshold": threshold, "reference": "torch fp32",
        "value": (max(worst) if metric == "max_rel" else min(worst)) if worst else None,
        "passed": passed, "cases": results,
    }
    if not passed:
        bad = next(r for r in results if not r["passed"])
        shown = bad.get("detail") or f"{metric}={bad['value']:.4g}"
        op = "<=" if metric == "max_rel" else ">="
        raise ParityError(f"parity failed for graph {spec.stage} (case {bad['case']}, inputs "
                          f"{bad['input_shapes']}): {shown}, required {metric} {op} {threshold}; "
                          "the build was not written")
    return report, {"peak_rss_bytes": peak.bytes, "at": results[0]["input_shapes"],
                    "what": "ORT CPU session create + parity runs, RSS above the pre-session level"}


def check_tiled_decoder(folder: Path, segments: list[dict], spec: GraphSpec, feeds_by_case: dict,
                        refs: dict, tile: int) -> dict:
    """The VAE decoder's segments, run by the runtime's own exact tiled decode at a tile size that
    cuts every parity case into several tiles per axis, against the torch decoder: the same fp32
    gate as the whole graph (the cut and the tiling must change nothing but rounding)."""
    import onnxruntime as ort

    from ..runtime.vae_segmented import decode_segmented

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = {s["name"]: ort.InferenceSession(str(folder / s["file"]), opts,
                                                providers=["CPUExecutionProvider"])
                for s in segments}
    results = []
    for case, feeds in feeds_by_case.items():
        out = decode_segmented(lambda name, f: sessions[name].run(None, f)[0], segments,
                               feeds["latent_sample"], tile)
        res = compare(refs[case], out, "fp32", spec)
        results.append({"case": case, "input_shapes": {"latent_sample": list(
            feeds["latent_sample"].shape)}, "tile": tile, **res})
    del sessions
    worst = [r["value"] for r in results if r["value"] is not None]
    report = {"metric": "max_rel", "threshold": spec.fp32_max_rel, "reference": "torch fp32",
              "value": max(worst) if worst else None,
              "passed": all(r["passed"] for r in results), "cases": results}
    if not report["passed"]:
        bad = next(r for r in results if not r["passed"])
        shown = bad.get("detail") or f"max_rel={bad['value']:.4g}"
        raise ParityError(f"parity failed for the tiled {spec.stage} (case {bad['case']}, tile "
                          f"{tile} latents): {shown}, required max_rel <= {spec.fp32_max_rel}; "
                          "the build was not written")
    return report


def check_unet_chunks(folder: Path, parts: list[dict], spec: GraphSpec, graph_precision: str,
                      feeds_by_case: dict, refs: dict) -> dict:
    """Each UNet chunk against the same tensors inside the whole graph, then the chained chunks
    against torch with the whole graph's own gate.

    Per chunk: the whole graph, with every carried tensor added as an output, runs once per case;
    each chunk is fed the whole graph's values and must reproduce its outputs within the graph's
    max_rel threshold (fp32: 1e-4; fp16: 1e-2, i.e. ten fp16 ulps of the largest value, since
    the chunk and the whole graph may round a fused op differently). Integer (shape) tensors must
    match exactly. Chained: the runtime's own chunk runner, fed only the graph inputs."""
    import onnx
    import onnxruntime as ort

    from ..runtime.unet_chunks import run_chunks

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # the runtime's CPU level (runtime/sessions.py); onnxruntime's full level also fails to keep
    # a carried Conv output of a quantized UNet as a graph output of the probe below
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if graph_precision == "fp16":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # see check_graph
    carried = list(dict.fromkeys(t for p in parts[:-1] for t in p["outputs"]))
    infos = {}  # the chunks declare the carried tensors' types (split_graph inferred any missing)
    for part in parts:
        chunk = onnx.load(str(folder / part["file"]), load_external_data=False)
        infos.update({v.name: v for v in chunk.graph.output})
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    have = {o.name for o in proto.graph.output}
    proto.graph.output.extend([infos[t] for t in carried if t not in have])
    probe = folder / ".probe.onnx"  # next to the data file it references; removed below
    onnx.save(proto, str(probe))
    del proto
    try:
        session = ort.InferenceSession(str(probe), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        inside = {case: {**feeds, **dict(zip(names, session.run(None, feeds)))}
                  for case, feeds in feeds_by_case.items()}
        del session
    finally:
        probe.unlink(missing_ok=True)
    limit = spec.fp32_max_rel if graph_precision == "fp32" else 1e-2
    per_chunk = []

    def load(part):
        return ort.InferenceSession(str(folder / part["file"]), opts,
                                    providers=["CPUExecutionProvider"])

    for part in parts:  # one chunk alive at a time, as the runtime streams them
        session = load(part)
        worst = 0.0
        for case, values in inside.items():
            outs = session.run(part["outputs"], {n: values[n] for n in part["inputs"]})
            for name, out in zip(part["outputs"], outs):
                want = values[name]
                if out.shape != want.shape or (out.dtype.kind in "iub" and
                                               not np.array_equal(out, want)):
                    worst = float("inf")
                elif out.dtype.kind == "f":
                    if not np.isfinite(out).all():
                        worst = float("inf")
                        continue
                    d = np.abs(out.astype(np.float64) - want.astype(np.float64)).max(initial=0.0)
                    worst = max(worst, float(d / max(np.abs(want).max(initial=0.0), 1e-12)))
        del session
        per_chunk.append({"chunk": part["name"], "max_rel": worst, "threshold": limit,
                          "passed": worst <= limit})
        if worst > limit:
            raise ParityError(f"parity failed for UNet {part['name']} ({part['file']}): max_rel "
                              f"{worst:.4g} against the whole graph, required <= {limit}; the "
                              "build was not written")
    results = []
    for case, feeds in feeds_by_case.items():
        out = run_chunks(lambda part, f: load(part).run(part["outputs"], f), parts, feeds)
        results.append({"case": case, **compare(refs[case], out, graph_precision, spec)})
    metric = "max_rel" if graph_precision == "fp32" else "psnr_db"
    worst = [r["value"] for r in results if r["value"] is not None]
    report = {"metric": metric, "reference": "torch fp32", "chunks": per_chunk,
              "threshold": spec.fp32_max_rel if metric == "max_rel" else spec.fp16_min_psnr,
              "value": (max(worst) if metric == "max_rel" else min(worst)) if worst else None,
              "passed": all(r["passed"] for r in results), "cases": results}
    if not report["passed"]:
        bad = next(r for r in results if not r["passed"])
        raise ParityError(f"parity failed for the chained UNet chunks (case {bad['case']}): "
                          f"{bad.get('detail') or bad['value']}, required {metric} "
                          f"{'<=' if metric == 'max_rel' else '>='} {report['threshold']}; the "
                          "build was not written")
    return report
