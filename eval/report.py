"""What `sdc eval` leaves in --out: eval.json (every number, the settings, versions, machine),
eval.md (one row per build) and grid.png (eval/grid.py), each written atomically: a temporary file
in the out folder (mkstemp, so the rename never crosses a file system), flushed, then os.replace.
An interrupted eval leaves the previous file or none, never half of one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

from .grid import HEAT_FULL


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: the temporary file must not stay behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:.2f} MiB"


def _pm(mean, std, unit="", fmt="{:.2f}") -> str:
    if mean is None:
        return "–"
    return f"{fmt.format(mean)} ± {fmt.format(std)}{unit}"


def _adherence_cell(a: dict | None) -> str:
    if not a:
        return "–"
    return " / ".join(f"{a[k]:.0f} %" for k in ("colour", "background", "shape") if k in a)


def markdown(report: dict) -> str:
    s = report["settings"]
    m = report["machine"]
    lines = [
        f"# sdc eval — reference `{s['reference']}`",
        "",
        f"{len(s['prompts'])} prompt(s) x {len(s['seeds'])} seed(s), {s['width']}x{s['height']}, "
        f"{s['steps']} steps, guidance {s['guidance']:g}, scheduler {s['scheduler']}, provider "
        f"{s['provider']}; {m['cpu']}, {m['cores']} cores; sdc {report['versions']['sdc']}, "
        f"onnxruntime {report['versions'].get('onnxruntime') or report['versions'].get('onnxruntime-gpu')}; "
        f"{report['created']}.",
        "",
        "Prompts (grid columns p<i> s<seed>): " + "; ".join(
            f"p{i} = {p!r}" for i, p in enumerate(s["prompts"])) + ".",
        "",
        "| build | size | compression | time / image | speed-up | peak memory | PSNR (worst) | "
        "SSIM (worst) | max abs | adherence colour / bg / shape |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(report["builds"]):
        q, t = r["quality"], r["time_per_image"]
        time_cell = _pm(t["mean_s"], t["std_s"], " s") if t["mean_s"] is not None \
            else f"{t['first_s']:.2f} s"
        lines.append(
            f"| {r['name']} ({r['precision']}) | {_mib(r['size']['total_bytes'])} | "
            f"{r['compression']:.2f}x | {time_cell} (first {t['first_s']:.2f} s) | "
            f"{r['speedup']:.2f}x | {_mib(r['peak_bytes'])} | "
            + ("reference | reference | reference | " if i == 0 else
               f"{q['psnr_db']['mean']:.1f} dB ({q['psnr_db']['worst']:.1f}) | "
               f"{q['ssim']['mean']:.4f} ({q['ssim']['worst']:.4f}) | "
               f"{q['max_abs']['worst']:.0f} | ")
            + f"{_adherence_cell(r['adherence'])} |")
    lines += ["", "Per graph on fixed inputs, against the reference build's same graph "
              "(relative L2 error, PSNR over the reference output's range):", "",
              "| build | " + " | ".join(s["graphs"]) + " |",
              "|---|" + "---|" * len(s["graphs"])]
    for r in report["builds"]:
        cells = []
        for g in s["graphs"]:
            d = r["graphs"][g]
            cells.append("not finite" if not d["finite"]
                         else f"{d['rel_error']:.2e} ({d['psnr_db']:.1f} dB)")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Bytes on disk per stage: " + "; ".join(
        f"{r['name']}: " + ", ".join(f"{k} {_mib(v)}" for k, v in r["size"]["stages"].items())
        for r in report["builds"])]
    lines += ["", "Session load time per stage (s): " + "; ".join(
        f"{r['name']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["load_seconds"].items())
        for r in report["builds"]),
        "", "Providers: " + "; ".join(f"{r['name']}: {', '.join(r['providers'])}"
                                      for r in report["builds"]),
        "", f"grid.png: one row per build, then |build - reference| per pixel (max over channels; "
            f"black = identical, white = {HEAT_FULL} levels or more).", ""]
    return "\n".join(lines)


def write_outputs(out: Path, report: dict, images: dict) -> Path:
    """grid.png, eval.json, then eval.md (the summary last: its presence means the rest is there)."""
    from .grid import make_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [r["name"] for r in report["builds"]]
    captions = [f"p{report['settings']['prompts'].index(j['prompt'])} s{j['seed']}"
                for j in report["jobs"]]
    buf = io.BytesIO()
    make_grid(names, images, captions).save(buf, format="PNG")
    write_atomic(out / "grid.png", buf.getvalue())
    write_atomic(out / "eval.json", (json.dumps(report, indent=1, allow_nan=False) + "\n").encode())
    write_atomic(out / "eval.md", markdown(report).encode())
    return out
