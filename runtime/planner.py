"""The memory planner: before anything runs, choose how `sdc run` executes so its peak stays under
`--vram-budget`, from the build's measured profile (manifest `memory_profile`) alone.

What it chooses
  unet       the whole graph (loaded once), or the build's chunks (`--unet-chunks`): chunks in
             `resident` stay loaded for the loop, the others are created, run and released on
             every pass, so a budget below the UNet's weights still runs
  micro      UNet rows per pass: the whole CFG batch (2 x batch), one half (= cfg split), or 1
  vae_tile   0 (whole decoder) or an exact tile size (decoder segments)
Stages run one at a time whatever the budget: within one run each session is created once either
way, so keeping one resident across stages would cost memory and save no time.

How it estimates
  Each unit's measured points are fitted linearly in the work its shape implies (batch x latent
  pixels; tiles add the tile's area and count), never below a measured point at or under the
  query, then scaled by SAFETY and offset by SLACK. A stage's estimate adds what the whole run
  holds beside it: onnxruntime's one-time setup (`first_session_bytes`), the tokenizer
  (`runtime_held_bytes`) and the images decoded so far. Time is estimated the same way from the
  measured run and load seconds, and a budget picks the fastest plan that fits; no budget picks the
  fastest plan outright (VAE tiles only above 64 latents, as before budgets existed). Plans within
  TIE (3 %) of the fastest count as equally fast and the smallest peak among them wins: on CPU the
  UNet's time is linear in rows, so a CFG split costs nothing there and halves its activations.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import SdcError
from .manifest import stage_with, stages_with
from .memory import fmt_bytes

# A 512² SD1.5 run streaming chunks peaked 9 % above its chunk's one-pass profile (it creates
# each chunk 40 times, the profile once), which was 0.98 of its plan at 1.10; other runs 0.89-0.90.
SAFETY = 1.15
SLACK = 8 * 2**20  # bytes: Python-side arrays and heap noise the units do not see
TILES = (64, 48, 32, 24, 16, 8)  # latents, largest (fastest) first
TIE = 0.03  # plans whose estimated times differ by less are equally fast: take the smaller peak


@dataclass
class StagePlan:
    stage: str
    holds: str  # what is resident while it runs
    peak: int  # estimated bytes above the baseline
    seconds: float
    held: int = 0  # estimated bytes its session keeps between runs (weights, arena); 0: not kept
    host: bool = False  # on the CPU provider while the run's others use the device (--stage-provider)


@dataclass
class Plan:
    budget: int | None
    unet: str  # "whole" | "chunks"
    resident: tuple[int, ...]  # chunk indices kept loaded (chunks only)
    chunks: int
    micro: int  # UNet rows per pass
    rows: int  # UNet rows per step (2 x batch with CFG)
    vae_tile: int
    attention: str
    stages: list[StagePlan] = field(default_factory=list)
    baseline: int = 0
    pixel: bool = False  # a pixel cascade (DeepFloyd IF): no VAE, denoisers at their own sizes

    @property
    def peak(self) -> int:
        """The peak the budget bounds: the stages on the run's device (all of them on CPU)."""
        return max((s.peak for s in self.stages if not s.host), default=0)

    @property
    def host_peak(self) -> int | None:
        """Host memory of the stages placed on the CPU beside a device run (None: none are)."""
        host = [s.peak for s in self.stages if s.host]
        return max(host) if host else None

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def resident_peak(self) -> int | None:
        """The peak when every stage's session stays loaded across requests (a warm server):
        each stage's own peak plus what the others hold. None when a stage cannot stay resident
        (a streamed, chunked UNet)."""
        device = [s for s in self.stages if not s.host]
        if any(not s.held for s in device):
            return None
        return max(s.peak + sum(o.held for o in device if o is not s) for s in device)

    @property
    def cfg_split(self) -> bool:
        return self.micro < self.rows

    def describe(self) -> list[str]:
        streamed = self.chunks - len(self.resident)
        unet = ("whole graph" if self.unet == "whole" else
                f"{self.chunks} chunks, {len(self.resident)} resident, {streamed} streamed per pass")
        lines = [
            f"budget      {fmt_bytes(self.budget) if self.budget else 'none (fastest plan)'}",
            f"baseline    {fmt_bytes(self.baseline)} (interpreter + libraries, not in the budget)",
            f"unet        {unet}; {self.micro} row(s) per pass of {self.rows}"
            + (" (CFG split)" if self.cfg_split else ""),
            f"attention   {self.attention}",
        ]
        if self.pixel:
            lines[2] = (f"cascade     {' -> '.join(s.stage for s in self.stages)}, each whole; "
                        f"{self.micro} row(s) per pass" + (" (CFG split)" if self.cfg_split else ""))
        else:
            lines.append(f"vae tile    {self.vae_tile or 'whole image'}"
                         + (" latents (exact segments)" if self.vae_tile else ""))
        lines += [f"{s.stage:<13} holds {s.holds}: peak {fmt_bytes(s.peak)}, ~{s.seconds:.1f} s"
                  + (" (host memory: on the CPU, outside the budget)" if s.host else "")
                  for s in self.stages]
        lines.append(f"total       peak {fmt_bytes(self.peak)} above baseline, ~{self.seconds:.0f} s "
                     "(estimates from the build's measured profile)")
        if self.host_peak is not None:
            lines.append(f"host        peak {fmt_bytes(self.host_peak)} for the stages on the CPU "
                         "(counted apart from the device budget)")
        if self.resident_peak is not None:
            lines.append(f"resident    every session kept across requests (sdc serve): peak "
                         f"{fmt_bytes(self.resident_peak)}")
        return lines


class _Fit:
    """Least-squares line through a unit's measured points, floored by the points it dominates."""

    def __init__(self, points: list[dict], features, key: str):
        self.features = features
        self.pts = [(np.array(features(p), float), float(p[key])) for p in points
                    if p.get(key) is not None]
        if not self.pts:
            raise SdcError("this build's memory profile has no measured points; rebuild it")
        a = np.array([x for x, _ in self.pts])
        y = np.array([v for _, v in self.pts])
        self.coef = np.linalg.lstsq(a, y, rcond=None)[0]

    def __call__(self, p: dict) -> float:
        x = np.array(self.features(p), float)
        under = [v for xp, v in self.pts if (xp <= x + 1e-9).all()]
        floor = max(under) if under else min(v for _, v in self.pts)
        return max(float(x @ self.coef), floor)


def _plain(p: dict) -> list[float]:
    return [1.0, p.get("batch", 1) * p.get("lat", 1) ** 2]


def _tiled(p: dict) -> list[float]:
    lat, tile = p["lat"], p.get("tile") or p["lat"]
    return [1.0, p.get("batch", 1) * lat ** 2, min(tile, lat) ** 2]


def _tiled_time(p: dict) -> list[float]:
    lat, tile = p["lat"], p.get("tile") or p["lat"]
    return [1.0, p.get("batch", 1) * lat ** 2, math.ceil(lat / tile) ** 2]


class _Unit:
    def __init__(self, unit: dict, features=_plain, time_features=None):
        pts = unit["points"]
        self.peak = _Fit(pts, features, "peak")
        self.held = _Fit(pts, features, "held")
        self.run = _Fit(pts, time_features or features, "run_s")
        self.load = float(np.median([p["load_s"] for p in pts]))


def _est(x: float) -> int:
    return int(x * SAFETY + SLACK)


def make_plan(manifest: dict, *, batch: int, cfg: bool, width: int, height: int, steps: int,
              budget: int | None = None, vae_tile: int | None = None, cfg_split: bool | None = None,
              img2img: bool = False, host: frozenset = frozenset(),
              cascade: tuple | None = None) -> Plan | None:
    """The fastest plan whose estimated peak fits `budget` (None: the fastest plan). `vae_tile`
    and `cfg_split` given by the user are kept as they are. Raises SdcError, naming the smallest
    budget that would fit, when none does; None for a build without a memory profile."""
    if not manifest.get("memory_profile"):
        if budget is not None:
            raise SdcError("--vram-budget: this build has no measured memory profile (built by an "
                           "older sdc); rebuild it with this sdc to plan against a budget")
        return None
    try:
        if cascade is not None:
            plans = cascade_plans(manifest, batch=batch, cfg=cfg, width=width, height=height,
                                  steps=steps, budget=budget, cfg_split=cfg_split, host=host,
                                  cascade=cascade)
        else:
            plans = candidate_plans(manifest, batch=batch, cfg=cfg, width=width, height=height,
                                    steps=steps, budget=budget, vae_tile=vae_tile,
                                    cfg_split=cfg_split, img2img=img2img, host=host)
    except SdcError:  # no peaks measured (not Linux): nothing to plan, nothing asked
        if budget is not None:
            raise
        return None
    fitting = [p for p in plans if budget is None or p.peak <= budget]
    if not fitting:
        low = min(plans, key=lambda p: p.peak)
        hint = ("rebuild with more --unet-chunks to lower the UNet's share" if low.chunks else
                "rebuild with --unet-chunks 4 (the UNet's weights are its floor now)")
        what = f"{low.unet}, {low.micro} row(s) per pass, VAE tile {low.vae_tile or 'none'}"
        if low.pixel:  # a cascade: no chunks, no VAE; the largest stage is the floor
            top = max(low.stages, key=lambda st: st.peak)
            what = f"{top.stage} the largest stage, {low.micro} row(s) per pass"
            hint = (f"put {top.stage} on the CPU beside a CUDA run (--stage-provider "
                    f"{top.stage}=cpu), quantize it (sdc build --from ... --precision int8)")
        # rounded UP to a whole MiB: the figure is one the user can pass back and have accepted
        # (candidate plans do not depend on the budget's value, so the same plan then fits)
        need = min_budget_mib(low.peak)
        raise SdcError(f"--vram-budget {_exact(budget)}: no plan fits; the smallest budget that "
                       f"fits this build at {width}x{height}, batch {batch} is {need} MiB "
                       f"({what}); "
                       f"give --vram-budget {need}MiB or more, {hint}, or "
                       "lower --width/--height/--batch")
    # the fastest; among plans within TIE of it (estimates are not finer), the smallest peak
    fastest = min(p.seconds for p in fitting)
    return min((p for p in fitting if p.seconds <= fastest * (1 + TIE)), key=lambda p: p.peak)


def min_budget_mib(peak: int) -> int:
    """The smallest whole number of MiB that is >= `peak` bytes."""
    return -(-int(peak) // 2**20)


def _exact(n: int) -> str:
    """A budget as given, not rounded: fmt_bytes would print a 1-byte budget as "0 MiB"."""
    return fmt_bytes(n) if n % 2**20 == 0 or n >= 2**30 else f"{n} byte{'s' if n != 1 else ''}"


def candidate_plans(manifest: dict, *, batch: int, cfg: bool, width: int, height: int, steps: int,
                    budget: int | None = None, vae_tile: int | None = None,
                    cfg_split: bool | None = None, img2img: bool = False,
                    host: frozenset = frozenset()) -> list[Plan]:
    """Every plan the build allows for this run (with no budget: only the fastest settings).
    `host`: stages placed on the CPU beside a device run; their peaks are not held to the budget
    (they are in host memory) and are reported apart."""
    prof = manifest["memory_profile"]
    graphs = manifest["graphs"]
    model = manifest["model"]
    f = model["vae_scale_factor"]
    lh, lw = height // f, width // f
    lat = math.sqrt(lh * lw)  # the fits are in latent pixels: lat² = lh x lw
    g = prof["graphs"]
    fixed = prof["first_session_bytes"] + prof["runtime_held_bytes"]
    rows = 2 * batch if cfg else batch
    texts = stages_with(manifest, "text")
    unet, decoder = stage_with(manifest, "denoise"), stage_with(manifest, "decode")
    unet_whole = _Unit(g[unet]["whole"])
    chunk_units = [_Unit(c) for c in g[unet].get("chunks", [])]
    dec_whole = _Unit(g[decoder]["whole"])
    dec_tiled = (_Unit(g[decoder]["tiled"], _tiled, _tiled_time)
                 if "tiled" in g[decoder] else None)
    pixels = 3 * width * height * 4  # one decoded image held until the end
    latents = rows * model["latent_channels"] * lh * lw * 4 * 4  # latents, x, eps, scheduler state

    def te_stage(stage: str) -> StagePlan:
        te = _Unit(g[stage]["whole"])
        p = {"batch": rows}
        return StagePlan(stage, stage, _est(te.peak(p) + fixed), te.load + te.run(p),
                         _est(te.held(p)))

    def enc_stage() -> StagePlan:
        stage = stage_with(manifest, "encode_image")
        enc = _Unit(g[stage]["whole"])
        p = {"batch": 1, "lat": lat}
        return StagePlan(stage, stage, _est(enc.peak(p) + fixed + latents),
                         enc.load + enc.run(p), _est(enc.held(p)))

    def unet_stage(mode: str, resident: tuple, micro: int) -> StagePlan:
        p = {"batch": micro, "lat": lat}
        passes = math.ceil(rows / micro)
        if mode == "whole":
            return StagePlan(unet, f"{unet} (whole)", _est(unet_whole.peak(p) + fixed + latents),
                             unet_whole.load + steps * passes * unet_whole.run(p),
                             _est(unet_whole.held(p)))
        held = {k: chunk_units[k].held(p) for k in resident}
        peak = max(u.peak(p) + sum(v for j, v in held.items() if j != k)
                   for k, u in enumerate(chunk_units))
        # A resident chunk computes its share of what the whole graph computes (the whole's
        # steadier run time, split as the chunks' measured runs split it); a streamed chunk costs
        # what the profile measured for it as streamed: created, run once (weights paged in and
        # prepacked on that first run) and released, on every pass. Counting a streamed chunk at
        # its share of the whole's time made streaming look free (SDXL at 1024²: 191 s measured
        # against 137 s planned, and chosen over the whole graph with no budget given).
        runs = [u.run(p) for u in chunk_units]
        share = unet_whole.run(p) / max(sum(runs), 1e-9)
        per_pass = sum(runs[k] * share if k in resident else runs[k] + u.load
                       for k, u in enumerate(chunk_units))
        holds = (f"chunks {', '.join(str(k + 1) for k in resident)} resident + one streamed"
                 if resident else "one chunk at a time")
        return StagePlan(unet, holds, _est(peak + fixed + latents),
                         sum(chunk_units[k].load for k in resident) + steps * passes * per_pass)

    def dec_stage(tile: int) -> StagePlan:
        p = {"batch": 1, "lat": lat, "tile": tile}
        # a build without segments (a w8a8 decoder, an older build) blends whole-graph tiles:
        # planned at the whole decode's peak and time, an upper bound
        unit = dec_tiled if tile and dec_tiled else dec_whole
        peak = unit.peak(p) + fixed + pixels * batch
        what = (f"{decoder} (whole)" if not tile else f"{decoder} segments, {tile}-latent tiles"
                if dec_tiled else f"{decoder}, blended {tile}-latent tiles")
        return StagePlan(decoder, what, _est(peak), unit.load + batch * unit.run(p),
                         _est(unit.held(p)))

    unet_modes = [("whole", ())]
    if chunk_units:
        by_load = sorted(range(len(chunk_units)), key=lambda k: -chunk_units[k].load)
        unet_modes += [("chunks", tuple(sorted(by_load[:r]))) for r in range(len(chunk_units))]
    if cfg_split is not None:
        micros = [batch if (cfg and cfg_split) else rows]
    elif budget is None:
        # one image's rows per pass (its conditional and unconditional pair under CFG), whatever
        # the batch size: image i of a batch is then computed exactly as it is alone, so seeds
        # reproduce bit for bit across batch sizes. Passes of other sizes differ by a level on a
        # few pixels (ORT picks kernels by batch), and choosing among sizes by measured seconds
        # made the choice, and so the pixels, depend on the machine's load at build time.
        micros = [rows // batch]
    else:
        micros = sorted({rows, batch, 1}, reverse=True)
    if vae_tile is not None:
        tiles = [vae_tile]
    elif budget is None:
        # tiles only above the model's native size (SD1: 64 latents, SDXL: 128), where the
        # whole decoder's activations outgrow what its native size needs
        tiles = [AUTO_TILE if max(lh, lw) > auto_tile_above(model) and dec_tiled else 0]
    else:
        tiles = [0] + ([t for t in TILES if t < max(lh, lw)] if dec_tiled else [])
    attention = graphs[unet].get("attention", "MatMul-Softmax-MatMul (older build)")
    head = [te_stage(s) for s in texts] + ([enc_stage()] if img2img else [])
    unet_plans = {(m, r, mi): unet_stage(m, r, mi) for (m, r), mi in itertools.product(unet_modes, micros)}
    dec_plans = {t: dec_stage(t) for t in tiles}
    plans = []
    for (mode, resident, micro), tile in itertools.product(unet_plans, tiles):
        plan = Plan(budget, mode, resident, len(chunk_units), micro, rows, tile, attention,
                    head + [unet_plans[(mode, resident, micro)], dec_plans[tile]],
                    prof["baseline_bytes"])
        for s in plan.stages:
            s.host = s.stage in host
        plans.append(plan)
    return plans


def cascade_plans(manifest: dict, *, batch: int, cfg: bool, width: int, height: int, steps: int,
                  budget: int | None, cfg_split: bool | None, host: frozenset,
                  cascade: tuple) -> list[Plan]:
    """A pixel cascade's plans (DeepFloyd IF): the text encoder, then each denoiser whole, one
    session at a time, with the CFG rows in one pass or split. `cascade` = (the denoising stages
    run, stage II's steps, whether stage II guides). The T5 encoder, the memory problem of IF
    (4.7 B parameters in the XXL), goes on the CPU with --stage-provider text_encoder=cpu: then
    its peak is host memory, outside the device budget, and reported apart."""
    prof, model = manifest["memory_profile"], manifest["model"]
    g = prof["graphs"]
    fixed = prof["first_session_bytes"] + prof["runtime_held_bytes"]
    stages, steps_2, cfg_2 = cascade
    factor = manifest.get("cascade", {}).get("upscale", {}).get("factor", 1)
    c = model["latent_channels"]
    texts = stages_with(manifest, "text")
    rows_1 = 2 * batch if cfg else batch
    rows_te = 2 * batch if (cfg or cfg_2) else batch
    # the pixels every stage carries: the image, its CFG copy, the prediction, scheduler state,
    # and stage II's upscaled input
    images = lambda k, rows: rows * (2 * c) * width * height * k * k * 4 * 3  # noqa: E731
    out_bytes = 3 * width * height * factor ** (len(stages) - 1) * 4 * batch

    def te_stage(stage: str) -> StagePlan:
        te = _Unit(g[stage]["whole"])
        p = {"batch": rows_te}
        return StagePlan(stage, stage, _est(te.peak(p) + fixed), te.load + te.run(p),
                         _est(te.held(p)))

    def unet_stage(stage: str, k: int, rows: int, n: int, micro: int) -> StagePlan:
        unit = _Unit(g[stage]["whole"])
        lat = math.sqrt(width * height) * k
        p = {"batch": micro, "lat": lat}
        passes = math.ceil(rows / micro)
        return StagePlan(stage, f"{stage} (whole)",
                         _est(unit.peak(p) + fixed + images(k, rows) + out_bytes),
                         unit.load + n * passes * unit.run(p), _est(unit.held(p)))

    if cfg_split is not None:
        splits = [bool(cfg_split)]
    elif budget is None:
        splits = [False]
    else:
        splits = [False, True]
    plans = []
    head = [te_stage(s) for s in texts]
    for split in splits:
        micro = batch if split else 2 * batch
        body = [unet_stage(stages[0], 1, rows_1, steps, min(micro, rows_1))]
        if len(stages) > 1:
            rows_2 = 2 * batch if cfg_2 else batch
            body.append(unet_stage(stages[1], factor, rows_2, steps_2, min(micro, rows_2)))
        plan = Plan(budget, "whole", (), 0, micro, rows_1, 0,
                    manifest["graphs"][stages[0]].get("attention", ""), head + body,
                    prof["baseline_bytes"], pixel=True)
        for st in plan.stages:
            st.host = st.stage in host
        plans.append(plan)
    return plans


AUTO_TILE = 32  # latents: the tile an unbudgeted run decodes with above the native size


def auto_tile_above(model: dict) -> int:
    """Latent side above which an unbudgeted decode is tiled: the model's native latent size
    (64 for SD1's 512 px, 128 for SDXL's 1024 px), never below 64."""
    return max(64, int(model.get("default_size") or 512) // model["vae_scale_factor"])

