"""Diffusion schedulers for `sdc run`, in pure numpy (no torch, no diffusers, no scipy).

This module owns the sampling loop's arithmetic: the noise schedule (betas -> alphas_cumprod ->
sigmas), the inference timesteps, input scaling, the per-step update and `add_noise` for img2img.
Each scheduler reproduces the diffusers scheduler of the same name step for step, configured from
a diffusers `scheduler_config.json` dict with the semantics of `<DiffusersClass>.from_config(cfg)`:

    CLI name           diffusers class
    ddim               DDIMScheduler                  (eta = 0: deterministic)
    pndm               PNDMScheduler                  (PLMS with skip_prk_steps, or full PRK+PLMS)
    euler              EulerDiscreteScheduler
    euler-a            EulerAncestralDiscreteScheduler (stochastic: step() needs `noise`)
    dpmpp-2m           DPMSolverMultistepScheduler    (dpmsolver++, solver_order 2)
    dpmpp-2m-karras    DPMSolverMultistepScheduler    (same, use_karras_sigmas=True)
    lms                LMSDiscreteScheduler           (Lagrange coefficients integrated exactly)
    ddpm               DDPMScheduler                  (stochastic: step() needs `noise` where t > 0;
                                                       all six variance types incl. learned_range,
                                                       dynamic thresholding: DeepFloyd IF)

Config semantics: keys present in the dict override, keys absent take that class's own defaults
(defaults differ per class, e.g. timestep_spacing), keys the class does not know are ignored, and
keys listed in `_use_default_values` are dropped, as diffusers' ConfigMixin does. Keyword
overrides, `make_scheduler(name, config, variance_type="fixed_small")`, win over the dict like
`from_config(cfg, **kwargs)` (that one is how DeepFloyd IF LoRAs are sampled). Options this
runtime does not implement (thresholding outside ddpm, exponential/beta/lu/flow sigmas, s_churn,
...) raise `SchedulerError` (a ValueError) when set to a non-default value instead of being
ignored.

Precision: the schedule tables are quantized to float32 exactly where diffusers keeps them in
float32 (betas, alphas, sigma schedules), so both sides start from the same numbers; everything
applied to samples is computed in float64 and returned in the sample's dtype. DDPM also rounds
alpha_bar and each step's alpha and beta to float32 as the reference holds them: near t = 0 they
are 1 - (something ~1e-4 from 1), where that rounding alone moves a sample by 2e-5 to 4e-5.

Usage (the pipeline's loop):

    s = make_scheduler("euler", config)
    s.set_timesteps(25)
    x = noise * s.init_noise_sigma
    for t in s.timesteps:
        eps = unet(s.scale_model_input(x, t), t)
        x = s.step(eps, t, x, noise=rng.standard_normal(x.shape) if s.stochastic else None)
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import numpy as np
from numpy.polynomial import Polynomial

from ..errors import SdcError

__all__ = ["SCHEDULERS", "Scheduler", "SchedulerError", "make_scheduler"]


class SchedulerError(SdcError, ValueError):
    """Bad scheduler name, unsupported option or misuse. A ValueError for library callers and an
    SdcError so the CLI prints it as one line."""


_SPACINGS = ("leading", "trailing", "linspace")

# Keys every SD1-era diffusers scheduler shares, with the defaults those classes declare.
_COMMON_DEFAULTS = MappingProxyType({
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
})


def _defaults(**overrides: Any) -> Mapping[str, Any]:
    return MappingProxyType({**_COMMON_DEFAULTS, **overrides})


# --------------------------------------------------------------------------------------------
# Schedule tables
# --------------------------------------------------------------------------------------------

def _f32(x) -> np.ndarray:
    """Round to float32 and keep computing in float64: diffusers stores these tables in float32."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def _squaredcos_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    # Glide's cosine schedule: betas discretize alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi/2).
    t = np.arange(n + 1, dtype=np.float64) / n
    alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift/scale sqrt(alphas_cumprod) so the last step has zero SNR (arXiv 2305.08891, Alg. 1)."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    bar = root**2
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return 1.0 - alphas


def _alphas_cumprod(cfg: Mapping[str, Any], zero_snr_floor: bool) -> np.ndarray:
    n = int(cfg["num_train_timesteps"])
    schedule = cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        betas = _f32(cfg["trained_betas"])
    elif schedule == "linear":
        betas = _f32(np.linspace(cfg["beta_start"], cfg["beta_end"], n))
    elif schedule == "scaled_linear":
        # linspace of sqrt(beta), squared in float32 like the reference
        root = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n).astype(np.float32)
        betas = _f32(root * root)
    elif schedule == "squaredcos_cap_v2":
        betas = _f32(_squaredcos_betas(n))
    else:
        raise SchedulerError(f"beta_schedule {schedule!r} is not supported")  # _validate says more
    if cfg.get("rescale_betas_zero_snr"):
        betas = _f32(_rescale_zero_terminal_snr(betas))
    alphas = _f32(1.0 - betas)  # 1 - beta is rounded to float32 in the reference: keep that
    cumprod = np.cumprod(alphas)
    if cfg.get("rescale_betas_zero_snr") and zero_snr_floor:
        # The sigma-based classes replace the zero terminal alpha_bar by 2**-24: finite sigma_max.
        cumprod[-1] = 2.0**-24
    return cumprod


def _leading(n_train: int, n: int, offset: int) -> np.ndarray:
    """Descending 'leading' timesteps: multiples of n_train // n, plus steps_offset."""
    return (np.arange(0, n) * (n_train // n)).round()[::-1] + offset


def _trailing(n_train: int, n: int, start: int | None = None) -> np.ndarray:
    """Descending 'trailing' timesteps: stepping down from the end by n_train / n, minus one."""
    return np.arange(n_train if start is None else start, 0, -n_train / n).round() - 1


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels: uniform in sigma**(1/rho) from sigma_max to sigma_min."""
    ramp = np.linspace(0, 1, n)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _log_f32(sigmas: np.ndarray) -> np.ndarray:
    """log of a float32 sigma table, taken in float32 as the reference does (it feeds
    _sigma_to_t, whose fractional timesteps are sensitive to it)."""
    return np.log(sigmas.astype(np.float32)).astype(np.float64)


def _sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, by linear interpolation in log-sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    below = log_train_sigmas[:, None] <= log_sigma[None, :]  # (n_train, n)
    # the last training index at or below each log-sigma (0 if none), kept off the final index
    last = below.shape[0] - 1 - np.argmax(below[::-1], axis=0)
    low = np.where(below.any(axis=0), last, 0).clip(max=below.shape[0] - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _broadcast_to(values: np.ndarray, ndim: int) -> np.ndarray:
    """Per-batch scalars (B,) shaped to broadcast against a (B, ...) sample."""
    return values.reshape((-1,) + (1,) * (ndim - 1))


def _out_dtype(sample: np.ndarray) -> np.dtype:
    return sample.dtype if np.issubdtype(sample.dtype, np.floating) else np.dtype(np.float32)


# --------------------------------------------------------------------------------------------
# Base classes
# --------------------------------------------------------------------------------------------

class Scheduler:
    """Common config resolution, tables and img2img handling. Subclasses fill in the schedule
    (`_set_schedule`), the state (`_reset_state`) and the update (`step`)."""

    name: ClassVar[str]
    diffusers_class: ClassVar[str]
    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = False  # True: step() needs a fresh N(0, 1) `noise` every call
    _DEFAULTS: ClassVar[Mapping[str, Any]]
    _FORCED: ClassVar[Mapping[str, Any]] = MappingProxyType({})  # what the CLI name itself means
    # option -> the only value accepted (the class default); anything else is refused
    _REFUSED: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    _PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")
    _ZERO_SNR_FLOOR: ClassVar[bool] = False

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides: Any):
        if config is not None and not isinstance(config, Mapping):
            raise SchedulerError(f"scheduler config: expected a JSON object, found "
                                 f"{type(config).__name__}; rebuild the artifacts")
        raw = dict(config or {})
        # `_use_default_values` lists keys that were defaults of the class that saved the config:
        # they must take this class's defaults instead (diffusers' extract_init_dict).
        for key in raw.pop("_use_default_values", None) or ():
            raw.pop(key, None)
        # Keyword overrides (from_config's kwargs) come from the caller, not the build: an unknown
        # one is a bug to report, not a foreign key to ignore. The CLI name's _FORCED still wins.
        unknown = sorted(set(overrides) - set(self._DEFAULTS))
        if unknown:
            raise SchedulerError(f"scheduler {self.name!r} ({self.diffusers_class}) has no option "
                                 f"{', '.join(unknown)}")
        raw.update(overrides)
        self._raw_config = MappingProxyType(raw)
        self.config = MappingProxyType({**self._DEFAULTS,
                                        **{k: v for k, v in raw.items() if k in self._DEFAULTS},
                                        **self._FORCED})
        self._validate()
        self.num_train_timesteps = int(self.config["num_train_timesteps"])
        self.alphas_cumprod = _alphas_cumprod(self.config, self._ZERO_SNR_FLOOR)
        self.num_inference_steps: int | None = None
        self.timesteps = np.zeros(0, dtype=np.float32)
        self._begin_index: int | None = None
        self._reset_state()

    # -- configuration --------------------------------------------------------------------

    def _refuse(self, key: str, value: Any, accepted: str) -> SchedulerError:
        return SchedulerError(f"scheduler {self.name!r} ({self.diffusers_class}): {key}={value!r} "
                              f"is not supported by the numpy runtime (supported: {accepted})")

    def _check_types(self) -> None:
        """Each option has its default's type (a build's scheduler config is untrusted input):
        a string where a number belongs is one line here, not a ValueError deep in a step."""
        cfg = self.config
        for key, default in self._DEFAULTS.items():
            value = cfg[key]
            if default is None:  # options without a typed default (trained_betas) are checked below
                continue
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(default, float):
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                      and (math.isfinite(value) or value == default))  # -inf defaults exist
            elif isinstance(default, str):
                ok = isinstance(value, str)
            else:
                ok = True
            if not ok:
                raise SchedulerError(f"scheduler config: {key}={value!r}, expected "
                                     f"{type(default).__name__} like {default!r}; rebuild the artifacts")
        n = cfg["num_train_timesteps"]
        if not 2 <= n <= 100_000:
            raise SchedulerError(f"scheduler config: num_train_timesteps={n}, expected 2..100000")
        betas = cfg["trained_betas"]
        if betas is not None and not (
                isinstance(betas, list) and len(betas) == n
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1
                        for b in betas)):
            raise SchedulerError(f"scheduler config: trained_betas must be {n} numbers in (0, 1); "
                                 "rebuild the artifacts")
        if betas is None and not 0 < cfg["beta_start"] <= cfg["beta_end"] < 1:
            raise SchedulerError(f"scheduler config: beta_start={cfg['beta_start']}, beta_end="
                                 f"{cfg['beta_end']}, expected 0 < start <= end < 1")

    def _validate(self) -> None:
        self._check_types()
        cfg = self.config
        for key, only in self._REFUSED.items():
            value = cfg[key]
            if (bool(value) != only) if isinstance(only, bool) else (value != only):
                raise self._refuse(key, value, repr(only))
        if cfg["prediction_type"] not in self._PREDICTION_TYPES:
            raise self._refuse("prediction_type", cfg["prediction_type"],
                               ", ".join(self._PREDICTION_TYPES))
        if "timestep_spacing" in cfg and cfg["timestep_spacing"] not in _SPACINGS:
            raise self._refuse("timestep_spacing", cfg["timestep_spacing"], ", ".join(_SPACINGS))
        if cfg["trained_betas"] is None and cfg["beta_schedule"] not in (
                "linear", "scaled_linear", "squaredcos_cap_v2"):
            raise self._refuse("beta_schedule", cfg["beta_schedule"],
                               "linear, scaled_linear, squaredcos_cap_v2, or trained_betas")
        if cfg.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
            raise self._refuse("final_sigmas_type", cfg["final_sigmas_type"], "zero, sigma_min")

    # -- public API -------------------------------------------------------------------------

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the inference timesteps; resets all per-run state."""
        n = int(num_inference_steps)
        if n != num_inference_steps or n < 1:
            raise SchedulerError(f"num_inference_steps must be a positive integer, "
                                 f"got {num_inference_steps!r}")
        self.num_inference_steps = None  # until the new schedule is in place
        self.num_inference_steps = self._set_schedule(n)
        self._begin_index = None
        self._reset_state()

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        raise NotImplementedError

    def img2img_timesteps(self, num_inference_steps: int, strength: float) -> np.ndarray:
        """The tail of `timesteps` an img2img run denoises (StableDiffusionImg2ImgPipeline's
        get_timesteps); also sets the begin index so step()/add_noise() index from there."""
        if self.num_inference_steps is None:
            raise SchedulerError("call set_timesteps() before img2img_timesteps()")
        if not 0.0 <= strength <= 1.0:
            raise SchedulerError(f"img2img strength must be in [0, 1], got {strength!r}")
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        self._begin_index = t_start * self.order
        return self.timesteps[t_start * self.order:]

    # -- for subclasses -------------------------------------------------------------------

    def _set_schedule(self, n: int) -> int:
        """Set `timesteps` (and tables) for n steps; return the step count to record."""
        raise NotImplementedError

    def _reset_state(self) -> None:
        pass

    def _check_ready(self) -> None:
        if self.num_inference_steps is None:
            raise SchedulerError("call set_timesteps() before step()")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} steps={self.num_inference_steps}>"


class _AlphaScheduler(Scheduler):
    """DDIM, PNDM and DDPM: integer timesteps index alphas_cumprod directly; no step index."""

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        t = np.atleast_1d(np.asarray(timestep)).astype(np.int64)
        alpha_bar = _broadcast_to(_f32(self.alphas_cumprod[t]), original.ndim)
        out = np.sqrt(alpha_bar) * original + np.sqrt(1.0 - alpha_bar) * noise
        return out.astype(_out_dtype(original))

    def _alpha_bar_prev(self, prev_t: int) -> float:
        # Before the first training step there is no alpha_bar: set_alpha_to_one picks 1 or [0].
        if prev_t >= 0:
            return float(self.alphas_cumprod[prev_t])
        return 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])


class _IndexedScheduler(Scheduler):
    """Schedulers that walk a sigma table with a step index (k-diffusion style and DPM-Solver).

    `sigmas` has one entry per timestep plus the final one. The step index starts at the begin
    index (img2img) or at the position of the first timestep seen, then advances per step.
    """

    def _reset_state(self) -> None:
        self._step_index: int | None = None

    def _train_sigmas(self) -> np.ndarray:
        ac = self.alphas_cumprod
        return _f32(np.sqrt((1.0 - ac) / ac))

    def _index_for_timestep(self, timestep) -> int:
        hits = np.flatnonzero(self.timesteps == np.float32(timestep))
        if len(hits) == 0:
            raise SchedulerError(f"timestep {timestep!r} is not one of this scheduler's timesteps")
        # With repeated timesteps the first step uses the second match (diffusers' rule, so an
        # img2img run starting mid-schedule never skips a sigma).
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _current_index(self, timestep) -> int:
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            elif len(self.timesteps) and np.float32(timestep) == self.timesteps[0]:
                # A run from the top starts at step 0. The reference's second-match rule would
                # start at 1 when the first timestep repeats (Karras schedules rounded to
                # integers) and then run off the end of the schedule; img2img, the case that
                # rule exists for, sets a begin index here instead.
                self._step_index = 0
            else:
                self._step_index = self._index_for_timestep(timestep)
        return self._step_index

    def _noise_index(self, timesteps: np.ndarray) -> list[int]:
        # Which sigma add_noise uses: by lookup when no begin index was set; else the current step
        # (inpainting, after the first step) or the begin index (img2img, before it).
        if self._begin_index is None:
            return [self._index_for_timestep(t) for t in timesteps]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * len(timesteps)


class _SigmaScheduler(_IndexedScheduler):
    """k-diffusion style (Euler, Euler ancestral, LMS): x = x0 + sigma * eps, the UNet input is
    scaled by 1/sqrt(sigma^2 + 1), and the initial noise is scaled up to sigma_max."""

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        self.sigmas = np.concatenate([self._train_sigmas()[::-1], [0.0]])

    @property
    def init_noise_sigma(self) -> float:
        sigma_max = float(np.max(self.sigmas))
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return sigma_max
        return (sigma_max**2 + 1) ** 0.5

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        sigma = self.sigmas[self._current_index(timestep)]
        return (sample / (sigma**2 + 1) ** 0.5).astype(_out_dtype(sample))

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        idx = self._noise_index(np.atleast_1d(np.asarray(timestep)))
        sigma = _broadcast_to(self.sigmas[idx], original.ndim)
        return (original + noise * sigma).astype(_out_dtype(original))

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        """Descending float32 timesteps (fractional for 'linspace', like the reference)."""
        spacing, n_train = self.config["timestep_spacing"], self.num_train_timesteps
        if spacing == "linspace":
            return np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].copy()
        if spacing == "leading":
            return _leading(n_train, n, 0).astype(np.float32) + self.config["steps_offset"]
        return _trailing(n_train, n).astype(np.float32)

    def _denoised(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        """The model's estimate of x0 at noise level sigma."""
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return sample - sigma * model_output
        if kind == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        return model_output  # "sample"

    def _interpolated_schedule(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(timesteps, sigmas at them, log of the training sigmas)."""
        timesteps = self._spaced_timesteps(n)
        train = self._train_sigmas()
        sigmas = np.interp(timesteps.astype(np.float64), np.arange(len(train)), train)
        return timesteps, sigmas, _log_f32(train)


# --------------------------------------------------------------------------------------------
# The eight schedulers
# --------------------------------------------------------------------------------------------

class DDIM(_AlphaScheduler):
    """DDIM with eta = 0 (Song et al. 2020): deterministic, first order."""

    name = "ddim"
    diffusers_class = "DDIMScheduler"
    _DEFAULTS = _defaults(clip_sample=True, set_alpha_to_one=True, thresholding=False,
                          dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
                          sample_max_value=1.0, timestep_spacing="leading",
                          rescale_betas_zero_snr=False)
    _REFUSED = MappingProxyType({"thresholding": False})
    _PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

    def _set_schedule(self, n: int) -> int:
        if n > self.num_train_timesteps:
            raise SchedulerError(f"num_inference_steps {n} exceeds num_train_timesteps "
                                 f"{self.num_train_timesteps}")
        spacing, n_train = self.config["timestep_spacing"], self.num_train_timesteps
        if spacing == "linspace":
            ts = np.linspace(0, n_train - 1, n).round()[::-1]
        elif spacing == "leading":
            ts = _leading(n_train, n, self.config["steps_offset"])
        else:
            ts = _trailing(n_train, n)
        self.timesteps = ts.astype(np.int64).astype(np.float32)
        return n

    def step(self, model_output, timestep, sample, noise=None):
        self._check_ready()
        t = int(round(float(timestep)))
        # The reference steps back by n_train // n whatever the spacing: kept for parity.
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        a_t, a_prev = float(self.alphas_cumprod[t]), self._alpha_bar_prev(prev_t)
        b_t = 1.0 - a_t
        x, out = sample.astype(np.float64), model_output.astype(np.float64)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0, eps = (x - b_t**0.5 * out) / a_t**0.5, out
        elif kind == "v_prediction":
            x0, eps = a_t**0.5 * x - b_t**0.5 * out, a_t**0.5 * out + b_t**0.5 * x
        else:  # "sample"
            x0, eps = out, (x - a_t**0.5 * out) / b_t**0.5
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            x0 = np.clip(x0, -limit, limit)  # eps is deliberately not recomputed (reference)
        prev = a_prev**0.5 * x0 + (1.0 - a_prev) ** 0.5 * eps
        return prev.astype(_out_dtype(sample))


class PNDM(_AlphaScheduler):
    """Pseudo numerical methods (Liu et al. 2022). With skip_prk_steps (what SD ships) this is
    PLMS: linear multistep up to 4th order on the model outputs, warmed up by one Heun-like
    pair; without it, 12 Runge-Kutta (PRK) steps precede PLMS."""

    name = "pndm"
    diffusers_class = "PNDMScheduler"
    _DEFAULTS = _defaults(skip_prk_steps=False, set_alpha_to_one=False,
                          timestep_spacing="leading")
    _PNDM_ORDER = 4

    def _reset_state(self) -> None:
        self._ets: list[np.ndarray] = []  # past model outputs (PLMS history)
        self._counter = 0
        self._cur_model_output: np.ndarray | float = 0.0
        self._cur_sample: np.ndarray | None = None

    def _set_schedule(self, n: int) -> int:
        spacing, n_train = self.config["timestep_spacing"], self.num_train_timesteps
        # ascending here (the PLMS list below is reversed)
        if spacing == "linspace":
            ts = np.linspace(0, n_train - 1, n).round()
        elif spacing == "leading":
            ts = _leading(n_train, n, self.config["steps_offset"])[::-1]
        else:
            ts = _trailing(n_train, n)[::-1]
        ts = ts.astype(np.int64)
        if self.config["skip_prk_steps"]:
            # PLMS repeats the second-to-last timestep: its warm-up takes two model calls there.
            self._prk_timesteps = np.zeros(0, dtype=np.int64)
            plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
        else:
            if n < self._PNDM_ORDER:
                raise SchedulerError(f"pndm with skip_prk_steps=False needs at least "
                                     f"{self._PNDM_ORDER} steps, got {n}")
            half = n_train // n // 2
            prk = ts[-self._PNDM_ORDER:].repeat(2) + np.tile([0, half], self._PNDM_ORDER)
            self._prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = ts[:-3][::-1]
        self.timesteps = np.concatenate([self._prk_timesteps, plms]).astype(np.float32)
        return n

    def step(self, model_output, timestep, sample, noise=None):
        self._check_ready()
        out, x = model_output.astype(np.float64), sample.astype(np.float64)
        t = int(round(float(timestep)))
        if self._counter < len(self._prk_timesteps) and not self.config["skip_prk_steps"]:
            prev = self._step_prk(out, t, x)
        else:
            prev = self._step_plms(out, t, x)
        self._counter += 1
        return prev.astype(_out_dtype(sample))

    def _step_prk(self, out: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        # Classic RK4 over four model calls: weights 1/6, 1/3, 1/3, 1/6, all from the sample
        # saved at the first call; odd calls target the half step, even ones the full step.
        k = self._counter
        prev_t = t - (0 if k % 2 else self.num_train_timesteps // self.num_inference_steps // 2)
        t = int(self._prk_timesteps[k // 4 * 4])
        if k % 4 == 0:
            self._cur_model_output = self._cur_model_output + out / 6
            self._ets.append(out)
            self._cur_sample = x
        elif k % 4 in (1, 2):
            self._cur_model_output = self._cur_model_output + out / 3
        else:
            out = self._cur_model_output + out / 6
            self._cur_model_output = 0.0
        base = self._cur_sample if self._cur_sample is not None else x
        return self._prev_sample(base, t, prev_t, out)

    def _step_plms(self, out: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        if not self.config["skip_prk_steps"] and len(self._ets) < 3:
            raise SchedulerError("pndm: PLMS steps need the 12 PRK steps to run first")
        stride = self.num_train_timesteps // self.num_inference_steps
        prev_t = t - stride
        if self._counter != 1:
            self._ets = self._ets[-3:] + [out]
        else:
            # Second call of the warm-up: same timestep again, finishing the first step.
            prev_t, t = t, t + stride
        ets = self._ets
        if len(ets) == 1 and self._counter == 0:
            self._cur_sample = x
        elif len(ets) == 1 and self._counter == 1:
            out = (out + ets[-1]) / 2
            x, self._cur_sample = self._cur_sample, None
        elif len(ets) == 2:
            out = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            out = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            out = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        return self._prev_sample(x, t, prev_t, out)

    def _prev_sample(self, x: np.ndarray, t: int, prev_t: int, out: np.ndarray) -> np.ndarray:
        """PNDM paper, formula (9): the transfer from x_t to x_{t-delta} given eps."""
        a_t, a_prev = float(self.alphas_cumprod[t]), self._alpha_bar_prev(prev_t)
        b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
        if self.config["prediction_type"] == "v_prediction":
            out = a_t**0.5 * out + b_t**0.5 * x  # to eps
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * out / denom


class DDPM(_AlphaScheduler):
    """Ancestral sampling (Ho et al. 2020): the mean of the posterior q(x_{t-1} | x_t, x0) at the
    model's x0, plus noise of a fixed or learned (Nichol & Dhariwal 2021) variance; the x0
    estimate optionally goes through dynamic thresholding (Saharia et al. 2022). DeepFloyd IF's
    scheduler: learned_range variance, thresholding at the 0.95 quantile.

    A model with a learned variance outputs twice the sample's channels: the first half is the
    prediction, the second the variance (learned: the variance itself; learned_range: v in
    [-1, 1] interpolating log-variance between the posterior's and beta's). step() takes such an
    output whatever variance_type is; a fixed variance type uses the first half only, as
    diffusers' IF pipelines split it off (that is how variance_type="fixed_small" samples a
    learned-variance model). Noise is added where the timestep is above 0, which is where the
    reference draws it: step() needs `noise` there and ignores it at t = 0."""

    name = "ddpm"
    diffusers_class = "DDPMScheduler"
    stochastic = True
    _DEFAULTS = _defaults(variance_type="fixed_small", clip_sample=True, thresholding=False,
                          dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
                          sample_max_value=1.0, timestep_spacing="leading",
                          rescale_betas_zero_snr=False)
    _PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
    _VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                       "learned", "learned_range")
    _LEARNED = ("learned", "learned_range")

    def needs_noise(self, timestep) -> bool:
        """Whether step() at `timestep` adds noise (the loop draws it only then, as diffusers
        does, so the generators' sequences stay aligned)."""
        return int(round(float(timestep))) > 0

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        # step() reads alpha_bar from the reference's float32 table: near t = 0 the posterior's
        # coefficients divide by 1 - alpha_bar ~ 1e-4, where float32 rounding of alpha_bar is
        # 1e-4 relative, so the rounding itself must be shared (2e-5 off a unit sample at t = 1
        # otherwise). Rounding the float64 product gives the reference's table bit for bit for
        # squaredcos_cap_v2 (IF); add_noise rounds the same way for every alpha scheduler.
        self.alphas_cumprod = _f32(self.alphas_cumprod)

    def _validate(self) -> None:
        super()._validate()
        cfg = self.config
        if cfg["variance_type"] not in self._VARIANCE_TYPES:
            raise self._refuse("variance_type", cfg["variance_type"],
                               ", ".join(self._VARIANCE_TYPES))
        ratio = cfg["dynamic_thresholding_ratio"]
        if not 0.0 <= ratio <= 1.0:
            raise SchedulerError(f"scheduler config: dynamic_thresholding_ratio={ratio!r}, "
                                 "expected a quantile in [0, 1]; rebuild the artifacts")
        for key in ("sample_max_value", "clip_sample_range"):
            if not cfg[key] > 0:
                raise SchedulerError(f"scheduler config: {key}={cfg[key]!r}, expected a number "
                                     "> 0; rebuild the artifacts")

    # The same spacing rules as DDIM (and the same n <= num_train_timesteps limit).
    _set_schedule = DDIM._set_schedule

    def _transition(self, timestep) -> tuple[int, int]:
        """(t, prev_t): prev_t is the next timestep of the schedule, -1 after the last (the
        reference's previous_timestep; not t - n_train // n, which differs for linspace and
        trailing spacings)."""
        hits = np.flatnonzero(self.timesteps == np.float32(timestep))
        if len(hits) == 0:
            raise SchedulerError(f"timestep {timestep!r} is not one of this scheduler's timesteps")
        i = int(hits[0])
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        return int(self.timesteps[i]), prev_t

    def _split(self, model_output: np.ndarray,
               sample: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(prediction, predicted variance or None) from a C- or 2C-channel model output."""
        out, kind = model_output.astype(np.float64), self.config["variance_type"]
        c = sample.shape[1] if sample.ndim >= 2 else 0
        if not (c and out.ndim == sample.ndim and out.shape[0] == sample.shape[0]
                and out.shape[2:] == sample.shape[2:] and out.shape[1] in (c, 2 * c)):
            raise SchedulerError(f"ddpm: model output of shape {model_output.shape} for a sample "
                                 f"of shape {sample.shape}: expected the sample's shape, or twice "
                                 "its channels (dim 1) with the variance in the second half")
        if out.shape[1] == c:
            if kind in self._LEARNED:
                raise SchedulerError(f"ddpm: variance_type={kind!r} needs the model's variance: "
                                     f"an output with 2 x {c} channels, got {c}; use "
                                     "variance_type='fixed_small' to sample without it")
            return out, None
        return out[:, :c], (out[:, c:] if kind in self._LEARNED else None)

    def _threshold(self, x0: np.ndarray) -> np.ndarray:
        """Dynamic thresholding: per sample, s = the ratio-quantile of |x0| clamped to
        [1, sample_max_value]; x0 is clipped to [-s, s] and divided by s."""
        flat = np.abs(x0.reshape(x0.shape[0], -1))
        n = flat.shape[1]
        # torch.quantile's linear interpolation with its float32 rank q * (n - 1) and its lerp
        # (numpy's own quantile takes the rank in float64: 5e-6 off the reference at n = 12288)
        rank = np.float32(self.config["dynamic_thresholding_ratio"]) * np.float32(n - 1)
        lo = int(rank)
        hi = min(lo + 1, n - 1)
        w = float(rank) - lo
        part = np.partition(flat, (lo, hi), axis=1)
        below, above = part[:, lo], part[:, hi]
        q = below + w * (above - below) if w < 0.5 else above - (above - below) * (1.0 - w)
        # min(max(q, 1), max_value): torch.clamp's order, so a max_value below 1 wins
        s = _broadcast_to(np.minimum(np.maximum(q, 1.0), self.config["sample_max_value"]),
                          x0.ndim)
        return np.clip(x0, -s, s) / s

    def _noise_scale(self, a_t: float, a_prev: float, beta: float,
                     predicted_variance: np.ndarray | None):
        """Standard deviation of the noise added to the posterior mean (a float or an array)."""
        kind = self.config["variance_type"]
        # the posterior variance, clamped (as the reference) because its log is taken
        small = max((1.0 - a_prev) / (1.0 - a_t) * beta, 1e-20)
        if kind in ("fixed_small", "fixed_small_log"):
            return small**0.5  # fixed_small_log: exp(log(var) / 2), the same number
        if kind in ("fixed_large", "fixed_large_log"):
            # fixed_large_log ("Glide max_log") is the log-variance log(beta), i.e. std sqrt(beta).
            # The reference takes sqrt(log(beta)) instead: NaN on every noised step.
            return beta**0.5
        if kind == "learned":
            return np.sqrt(predicted_variance)  # the model predicts the variance itself
        frac = (predicted_variance + 1.0) / 2.0  # learned_range
        with np.errstate(divide="ignore"):
            max_log, min_log = np.log(beta), math.log(small)
        return np.exp(0.5 * (frac * max_log + (1.0 - frac) * min_log))

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        # No set_timesteps() needed: DeepFloyd IF stage II noises its upscaled input this way
        # (noise_level 250) with a scheduler of its own.
        try:
            t = np.atleast_1d(np.asarray(timestep))
        except (TypeError, ValueError):  # ragged
            t = np.zeros(0)
        t = t.astype(np.float64) if t.dtype.kind in "iuf" else np.zeros(0)
        with np.errstate(invalid="ignore"):
            ok = t.size and np.all((0 <= t) & (t < self.num_train_timesteps) & (t == np.round(t)))
        if not ok:
            raise SchedulerError(f"ddpm add_noise: timestep {timestep!r}, expected integers 0.."
                                 f"{self.num_train_timesteps - 1}")
        return super().add_noise(original, noise, t)

    def step(self, model_output, timestep, sample, noise=None):
        self._check_ready()
        t, prev_t = self._transition(timestep)
        out, predicted_variance = self._split(model_output, sample)
        if t > 0 and noise is None:
            raise SchedulerError(f"ddpm is stochastic: step() at t={t} needs `noise`, a standard "
                                 "normal array shaped like the sample (only t = 0 adds none)")
        if t > 0 and np.shape(noise) != sample.shape:
            raise SchedulerError(f"ddpm: noise of shape {np.shape(noise)} for a sample of shape "
                                 f"{sample.shape}; expected the sample's shape")
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
        # alpha and beta of this (possibly multi-training-step) transition, rounded to float32 as
        # the reference holds them: beta = 1 - alpha cancels down to ~4e-4 near t = 0, where its
        # float32 rounding is 1e-4 relative and moves a unit sample by 4e-5 (IF, 100 steps)
        alpha = float(_f32(a_t / a_prev))
        beta = float(_f32(1.0 - alpha))
        x = sample.astype(np.float64)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = (x - b_t**0.5 * out) / a_t**0.5
        elif kind == "v_prediction":
            x0 = a_t**0.5 * x - b_t**0.5 * out
        else:  # "sample"
            x0 = out
        if self.config["thresholding"]:  # wins over clip_sample, as in the reference
            x0 = self._threshold(x0)
        elif self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            x0 = np.clip(x0, -limit, limit)
        # the posterior mean, formula (7) of Ho et al.
        prev = (a_prev**0.5 * beta / b_t) * x0 + (alpha**0.5 * b_prev / b_t) * x
        if t > 0:
            scale = self._noise_scale(a_t, a_prev, beta, predicted_variance)
            prev = prev + scale * np.asarray(noise, dtype=np.float64)
        return prev.astype(_out_dtype(sample))


class EulerDiscrete(_SigmaScheduler):
    """Euler's method on the probability-flow ODE in sigma (Karras et al. 2022, s_churn = 0)."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    _DEFAULTS = _defaults(interpolation_type="linear", use_karras_sigmas=False,
                          use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None,
                          sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
                          rescale_betas_zero_snr=False, final_sigmas_type="zero")
    _REFUSED = MappingProxyType({"interpolation_type": "linear", "use_exponential_sigmas": False,
                                 "use_beta_sigmas": False, "timestep_type": "discrete"})
    _PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
    _ZERO_SNR_FLOOR = True

    def _set_schedule(self, n: int) -> int:
        timesteps, sigmas, log_train = self._interpolated_schedule(n)
        if self.config["use_karras_sigmas"]:
            lo, hi = self.config["sigma_min"], self.config["sigma_max"]
            sigmas = _karras(sigmas[-1] if lo is None else lo, sigmas[0] if hi is None else hi, n)
            timesteps = _sigma_to_t(sigmas, log_train).astype(np.float32)
        last = self._train_sigmas()[0] if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = _f32(np.concatenate([sigmas, [last]]))
        self.timesteps = timesteps
        return n

    def step(self, model_output, timestep, sample, noise=None):
        self._check_ready()
        i = self._current_index(timestep)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = sample.astype(np.float64)
        x0 = self._denoised(model_output.astype(np.float64), x, sigma)
        prev = x + (x - x0) / sigma * (sigma_next - sigma)
        self._step_index = i + 1
        return prev.astype(_out_dtype(sample))


class EulerAncestral(_SigmaScheduler):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of size sigma_up."""

    name = "euler-a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    stochastic = True
    _DEFAULTS = _defaults(timestep_spacing="linspace", rescale_betas_zero_snr=False)
    _ZERO_SNR_FLOOR = True

    def _set_schedule(self, n: int) -> int:
        timesteps, sigmas, _ = self._interpolated_schedule(n)
        self.sigmas = _f32(np.concatenate([sigmas, [0.0]]))
        self.timesteps = timesteps
        return n

    def step(self, model_output, timestep, sample, noise=None):
        self._check_ready()
        if noise is None:
            # The reference draws one N(0, 1) tensor per step (even the last, where sigma_up is
            # 0); the caller draws it so it owns the RNG stream.
            raise SchedulerError("euler-a is stochastic: step() needs `noise`, a standard normal "
                                 "array shaped like the sample, on every step")
        i = self._current_index(timestep)
        sigma, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        # sigma_up = sqrt(to^2 (from^2 - to^2) / from^2) and sigma_down = sqrt(to^2 - up^2),
        # rewritten without the cancellation (to^2 - up^2 = to^4 / from^2) that turns the
        # reference's float32 version into sqrt(negative) = NaN when sigma_max is huge.
        ratio = sigma_to / sigma
        sigma_up = sigma_to * (1.0 - ratio**2) ** 0.5
        sigma_down = sigma_to * ratio
        x = sample.astype(np.float64)
        x0 = self._denoised(model_output.astype(np.float64), x, sigma)
        prev = x + (x - x0) / sigma * (sigma_down - sigma)
        prev = prev + np.asarray(noise, dtype=np.float64) * sigma_up
        self._step_index = i + 1
        return prev.astype(_out_dtype(sample))


class LMSDiscrete(_SigmaScheduler):
    """Linear multistep (up to 4th order) in sigma: the last derivatives are extrapolated with
    Lagrange polynomials, integrated exactly over [sigma_i, sigma_{i+1}]."""

    name = "lms"
    diffusers_class = "LMSDiscreteScheduler"
    _DEFAULTS = _defaults(use_karras_sigmas=False, use_exponential_sigmas=False,
                          use_beta_sigmas=False, timestep_spacing="linspace")
    _REFUSED = MappingProxyType({"use_exponential_sigmas": False, "use_beta_sigmas": False})
    _PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
    _MAX_ORDER = 4

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        # The reference schedules all training steps at construction; mirror it so that
        # init_noise_sigma and the tables agree before set_timesteps().
        self.set_timesteps(self.num_train_timesteps)
        self.num_inference_steps = None

    def _reset_state(self) -> None:
        super()._reset_state()
        self._derivatives: list[np.ndarray] = []

    def _set_schedule(self, n: int) -> int:
        timesteps, sigmas, log_train = self._interpolated_schedule(n)
        if self.config["use_karras_sigmas"]:
            sigmas = _karras(sigmas[-1], sigmas[0], n)
            timesteps = _sigma_to_t(sigmas, log_train).astype(np.float32)
        self.sigmas = _f32(np.concatenate([sigmas, [0.0]]))
        self.timesteps = timesteps
        return n

    def _coefficient(self, order: int, i: int, j: int) -> float:
        """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node i - j
        among the nodes sigma_i, ..., sigma_{i-order+1}. Exact: it is a polynomial."""
        s = self.sigmas
        others = [s[i - k] for k in range(order) if k != j]
        numerator = Polynomial.fromroots(others) if others else Polynomial([1.0])
        basis = numerator / float(np.prod([s[i - j] - o for o in others]))
        antiderivative = basis.integ()
        return float(antiderivative(s[i + 1]) - antiderivative(s[i]))

    def step(self, model_output, timestep, sample, noise=None):
        self._check_ready()
        i = self._current_index(timestep)
        sigma = self.sigmas[i]
        x = sample.astype(np.float64)
        x0 = self._denoised(model_output.astype(np.float64), x, sigma)
        self._derivatives = (self._derivatives + [(x - x0) / sigma])[-self._MAX_ORDER:]
        # The order follows the step index, not the history length: an img2img run starting
        # mid-schedule uses only the first coefficients of a higher-order rule (reference quirk).
        order = min(i + 1, self._MAX_ORDER)
        coefficients = [self._coefficient(order, i, j) for j in range(order)]
        prev = x + sum(c * d for c, d in zip(coefficients, reversed(self._derivatives)))
        self._step_index = i + 1
        return prev.astype(_out_dtype(sample))


class DPMSolverPP2M(_IndexedScheduler):
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-SNR on the data
    prediction; first order on the first step and (with a zero final sigma) the last."""

    name = "dpmpp-2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    _DEFAULTS = _defaults(
        solver_order=2, thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
        use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
        lambda_min_clipped=-math.inf, variance_type=None, timestep_spacing="linspace",
        rescale_betas_zero_snr=False, use_dynamic_shifting=False,
        time_shift_type="exponential")
    # The name fixes the method; a config saved from another DPM variant cannot change it.
    _FORCED = MappingProxyType({"algorithm_type": "dpmsolver++", "solver_order": 2,
                                "use_karras_sigmas": False})
    _REFUSED = MappingProxyType({"thresholding": False, "use_exponential_sigmas": False,
                                 "use_beta_sigmas": False, "use_lu_lambdas": False,
                                 "use_flow_sigmas": False, "variance_type": None,
                                 "use_dynamic_shifting": False})
    _PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
    _ZERO_SNR_FLOOR = True

    def _validate(self) -> None:
        super()._validate()
        solver = self.config["solver_type"]
        if solver not in ("midpoint", "heun", "logrho", "bh1", "bh2"):
            raise self._refuse("solver_type", solver, "midpoint, heun")

    @property
    def _solver_type(self) -> str:
        # DEIS/UniPC solver names in a borrowed config map to midpoint, as in the reference.
        return "heun" if self.config["solver_type"] == "heun" else "midpoint"

    def _reset_state(self) -> None:
        super()._reset_state()
        self._previous_x0: np.ndarray | None = None
        self._lower_order_nums = 0

    def _set_schedule(self, n: int) -> int:
        cfg, n_train = self.config, self.num_train_timesteps
        ac = self.alphas_cumprod
        # lambda_min_clipped trims the low-SNR end of the schedule (log-SNR/2 below the bound).
        half_log_snr = 0.5 * (np.log(ac) - np.log1p(-ac))
        last = n_train - int(np.searchsorted(half_log_snr[::-1], cfg["lambda_min_clipped"]))
        spacing = cfg["timestep_spacing"]
        # DPM spaces n + 1 points and drops the t = 0 end, unlike the other schedulers
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + cfg["steps_offset"]
        else:
            ts = _trailing(n_train, n, start=last)
        train = self._train_sigmas()
        if cfg["use_karras_sigmas"]:
            # sigma_min/sigma_max are not DPM options, yet the reference honours them when the
            # config dict carries them (it looks them up on the stored config).
            lo, hi = self._raw_config.get("sigma_min"), self._raw_config.get("sigma_max")
            sigmas = _karras(train[0] if lo is None else lo, train[-1] if hi is None else hi, n)
            ts = _sigma_to_t(sigmas, _log_f32(train))
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(len(train)), train)
        final = train[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = _f32(np.concatenate([sigmas, [final]]))
        self.timesteps = ts.astype(np.int64).astype(np.float32)  # int64 cast truncates, as there
        return len(ts)

    def _index_for_timestep(self, timestep) -> int:
        hits = np.flatnonzero(self.timesteps == np.float32(timestep))
        if len(hits) == 0:
            return len(self.timesteps) - 1  # the reference falls back to the last step
        return int(hits[1] if len(hits) > 1 else hits[0])

    @staticmethod
    def _vp(sigma: float) -> tuple[float, float, float]:
        """(alpha_t, sigma_t, lambda_t) of the variance-preserving process at k-sigma `sigma`."""
        alpha = 1.0 / (sigma**2 + 1) ** 0.5
        lam = math.inf if sigma == 0 else -math.log(sigma)  # log(alpha_t / sigma_t)
        return alpha, sigma * alpha, lam

    def _data_prediction(self, out: np.ndarray, x: np.ndarray, sigma: float) -> np.ndarray:
        alpha_t, sigma_t, _ = self._vp(sigma)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return (x - sigma_t * out) / alpha_t
        if kind == "v_prediction":
            return alpha_t * x - sigma_t * out
        return out  # "sample"

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        idx = self._noise_index(np.atleast_1d(np.asarray(timestep)))
        alphas, sigmas = zip(*(self._vp(s)[:2] for s in self.sigmas[idx]))
        alpha = _broadcast_to(np.array(alphas), original.ndim)
        sigma = _broadcast_to(np.array(sigmas), original.ndim)
        return (alpha * original + sigma * noise).astype(_out_dtype(original))

    def step(self, model_output, timestep, sample, noise=None):
        self._check_ready()
        cfg = self.config
        i = self._current_index(timestep)
        n = len(self.timesteps)
        final_first_order = i == n - 1 and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
            or cfg["final_sigmas_type"] == "zero")
        x = sample.astype(np.float64)
        x0 = self._data_prediction(model_output.astype(np.float64), x, self.sigmas[i])
        alpha_t, sigma_t, lambda_t = self._vp(self.sigmas[i + 1])
        _, sigma_s0, lambda_s0 = self._vp(self.sigmas[i])
        h = lambda_t - lambda_s0
        phi = math.expm1(-h) if math.isfinite(h) else -1.0  # exp(-h) - 1
        prev = (sigma_t / sigma_s0) * x - (alpha_t * phi) * x0
        if not (self._lower_order_nums < 1 or final_first_order):
            # second order: correct with the divided difference to the previous data prediction
            # (skipped when h = 0, a repeated sigma: the correction is zero there, and the
            # reference's 1/r0 = h/h_0 is too)
            if h != 0:
                _, _, lambda_s1 = self._vp(self.sigmas[i - 1])
                d1 = (x0 - self._previous_x0) * (h / (lambda_s0 - lambda_s1))
                if self._solver_type == "midpoint":
                    prev = prev - 0.5 * (alpha_t * phi) * d1
                else:
                    prev = prev + (alpha_t * (phi / h + 1.0)) * d1
        self._previous_x0 = x0
        self._lower_order_nums = min(self._lower_order_nums + 1, 2)
        self._step_index = i + 1
        return prev.astype(_out_dtype(sample))


class DPMSolverPP2MKarras(DPMSolverPP2M):
    """DPM-Solver++(2M) on Karras noise levels (rounded to integer timesteps)."""

    name = "dpmpp-2m-karras"
    _FORCED = MappingProxyType({**DPMSolverPP2M._FORCED, "use_karras_sigmas": True})


SCHEDULERS: Mapping[str, type[Scheduler]] = MappingProxyType({
    cls.name: cls for cls in (DDIM, PNDM, EulerDiscrete, EulerAncestral, DPMSolverPP2M,
                              DPMSolverPP2MKarras, LMSDiscrete, DDPM)
})


def make_scheduler(name: str, config: Mapping[str, Any] | None = None,
                   **overrides: Any) -> Scheduler:
    """The scheduler called `name` (a CLI name), configured like diffusers'
    from_config(config, **overrides): e.g. variance_type="fixed_small" for DeepFloyd IF LoRAs."""
    try:
        cls = SCHEDULERS[name]
    except (KeyError, TypeError):
        raise SchedulerError(f"unknown scheduler {name!r}; choose one of "
                             f"{', '.join(SCHEDULERS)}") from None
    return cls(config, **overrides)
