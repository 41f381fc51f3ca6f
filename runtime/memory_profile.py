"""Measured memory and time of each graph, for the planner: `sdc build` runs this once per stage,
each in a fresh subprocess (`python -m sdc.runtime.memory_profile JOB.json`), and stores what it
prints in the manifest's `memory_profile`.

It opens sessions exactly as `sdc run` does (runtime/sessions.py, same options), at two or three
reference shapes around the model's native size, and records for each unit (the whole graph,
every UNet chunk, the VAE decoder's tiled segments):

  peak    resident high-water mark above the level before the unit (VmHWM, reset per unit), with
          the unit's inputs and carried tensors counted, as the runtime holds them
  held    what stays resident after the run while the session is alive (a resident chunk's cost)
  load_s  session creation; run_s: one run at that shape

The planner (runtime/planner.py) fits these linearly in the work the shape implies (batch x
latent pixels; for tiles also the tile's area and count) and never extrapolates below a measured
point. Reference shapes: native/2 and native latents at batch 1 (the UNet's fused attention keeps
its activations linear in pixels; measured on the SD1.5 UNet: 16², 32², 64² b1 and 64² b2 lie
within 1 % of one line).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


from .memory import import_runtime_libraries, peak_bytes, reset_peak, rss_bytes


def reference_latents(model: dict) -> list[int]:
    """Latent sizes measured: half the native size and the native size (multiples of the UNet's)."""
    m = model["unet_multiple"]
    native = max(m, model.get("default_size", 512) // model["vae_scale_factor"] // m * m)
    half = max(m, native // 2 // m * m)
    return sorted({half, native})


def tile_points(model: dict) -> list[tuple[int, int]]:
    """(latent size, tile) pairs for the tiled decoder: two tile sizes at the native size and one
    at half, so image area and tile area are told apart."""
    from .pipeline import MIN_TILE

    sizes = reference_latents(model)
    native, half = sizes[-1], sizes[0]
    big, small = max(MIN_TILE, native // 2), max(MIN_TILE, native // 4)
    return sorted({(native, big), (native, small), (half, small)})


class _Unit:
    """One measurement window."""

    def __enter__(self):
        from .sessions import free_memory

        free_memory()
        self.level = rss_bytes()
        self.exact = reset_peak()
        self.t0 = time.perf_counter()
        return self

    def result(self, **extra) -> dict:
        peak = peak_bytes()
        return {"peak": (peak - self.level) if self.exact and peak else None,
                "held": rss_bytes() - self.level, **extra}

    def __exit__(self, *exc):
        from .sessions import free_memory

        free_memory()


def _feeds(job: dict, batch: int, lat: int, seq: int | None = None) -> dict:
    """The stage's inputs at one shape, from its family's GraphSpec (torch-free)."""
    from ..families import dims_of, family

    model = job["model"]
    f = model["vae_scale_factor"]
    case = {"batch": batch, "sequence": seq or model["max_sequence"], "latent_height": lat,
            "latent_width": lat, "height": lat * f, "width": lat * f}
    return family(job["family"]).spec(job["stage"]).dummy_inputs(dims_of(model), case)


def _whole(folder: Path, job: dict, points: list[dict]) -> dict:
    from .sessions import open_session

    out = []
    for pt in points:
        with _Unit() as u:
            t0 = time.perf_counter()
            s = open_session(folder, job["stage"], job["graph"], "cpu")
            load = time.perf_counter() - t0
            feeds = _feeds(job, pt["batch"], pt.get("lat", 1), pt.get("seq"))
            t0 = time.perf_counter()
            s.session.run(None, feeds)
            run = time.perf_counter() - t0
            out.append({**pt, **u.result(load_s=round(load, 3), run_s=round(run, 3))})
            del s, feeds
    return {"points": out}


def _chunks(folder: Path, job: dict, lats: list[int]) -> list[dict]:
    """Each chunk as the runtime streams it: created, run, released in turn along the chain, its
    peak counted above the level before the chain (so the carried tensors are in it)."""
    from .sessions import free_memory, open_session
    from .unet_chunks import run_chunks

    stage, graph = job["stage"], job["graph"]
    parts = graph["chunks"]["parts"]
    per_chunk = [{"points": []} for _ in parts]
    for lat in lats:
        with _Unit() as chain:
            feeds = _feeds(job, 1, lat)

            def run(part, f, lat=lat, chain=chain):
                k = parts.index(part)
                level = rss_bytes()
                t0 = time.perf_counter()
                s = open_session(folder, stage, graph, "cpu", onnx_file=f"{stage}/{part['file']}",
                                 prepack=False)
                load = time.perf_counter() - t0
                t0 = time.perf_counter()
                outs = s.session.run(part["outputs"], f)
                run_s = time.perf_counter() - t0
                peak = peak_bytes()
                per_chunk[k]["points"].append({
                    "batch": 1, "lat": lat, "load_s": round(load, 3), "run_s": round(run_s, 3),
                    "peak": (peak - chain.level) if chain.exact and peak else None,
                    "held": rss_bytes() - level})
                del s
                free_memory()
                reset_peak()
                return outs

            run_chunks(run, parts, feeds)
    return per_chunk


def _tiled(folder: Path, job: dict) -> dict:
    from .sessions import open_session
    from .vae_segmented import decode_segmented

    tiled = job["graph"]["tiled"]
    out = []
    for lat, tile in tile_points(job["model"]):
        with _Unit() as u:
            t0 = time.perf_counter()
            sessions = {s["name"]: open_session(folder, job["stage"], tiled, "cpu",
                                                onnx_file=s["file"], arena=False)
                        for s in tiled["segments"]}
            load = time.perf_counter() - t0
            z = _feeds(job, 1, lat)["latent_sample"]
            t0 = time.perf_counter()
            decode_segmented(lambda n, f: sessions[n].session.run(None, f)[0], tiled["segments"],
                             z, tile)
            run = time.perf_counter() - t0
            out.append({"batch": 1, "lat": lat, "tile": tile,
                        **u.result(load_s=round(load, 3), run_s=round(run, 3))})
            del sessions, z
    return {"points": out}


def profile(job: dict) -> dict:
    folder, graph, model, role = Path(job["folder"]), job["graph"], job["model"], job["role"]
    import_runtime_libraries()
    from .sessions import free_memory

    free_memory()
    lats = reference_latents(model)
    if role == "upscale":  # a cascade's super-resolution stage runs at factor x stage I's size
        lats = [lat * int(model["upscale_factor"]) for lat in lats]
    level = rss_bytes()
    # Warm-up: a process's first session also sets up onnxruntime itself (environment, thread
    # pools, kernel registries), which stays resident afterwards. Measured here once and kept out
    # of the units, so each unit's numbers are its own; the planner adds it to every stage.
    first = {"batch": 1, "lat": lats[0]} if role != "text" else {"batch": 1}
    _whole(folder, job, [first])
    free_memory()
    result = {"baseline_bytes": level, "first_session_bytes": max(0, rss_bytes() - level),
              "units": {}}
    if role == "text":
        from .store import check_relative
        from .tokenizer import make_tokenizer

        with _Unit() as u:  # what the run holds beside the graphs: the tokenizer
            check_relative(job["tokenizer"], "the stage's tokenizer", folder)
            tok = make_tokenizer(folder / job["tokenizer"], model["max_sequence"],
                                 job.get("tokenizer_kind", "clip"))
            tok(["a photo of a cat", ""])
            result["runtime_held_bytes"] = u.result()["held"]
        points = [{"batch": b} for b in (1, 4)]
    else:
        points = [{"batch": 1, "lat": lat} for lat in lats]
    result["units"]["whole"] = _whole(folder, job, points)
    if role == "denoise" and graph.get("chunks"):
        result["units"]["chunks"] = _chunks(folder, job, lats)
    if role == "decode" and graph.get("tiled"):
        result["units"]["tiled"] = _tiled(folder, job)
    return result


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    print(json.dumps(profile(job)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
