"""sdc.runtime.schedulers against diffusers, the oracle: same config dict, same inputs, a fake
deterministic "UNet", and the whole sampling loop compared step by step (timesteps,
init_noise_sigma, scale_model_input, every prev_sample), plus img2img, add_noise, state reset,
the refusals, and the torch-free import. DDPM also runs DeepFloyd IF's way (the section at the
end): learned_range variance from a 2C-channel model output, dynamic thresholding, add_noise.

Tolerance: the numpy side computes in float64 from float32-quantized schedule tables, diffusers
computes in float32 torch. One float32 operation is off by up to 2**-24 ~ 6e-8 relative; a step is
tens of operations and errors carry over up to 50 steps, so the reference itself sits ~1e-6 from
the exact result. 1e-5 of the largest magnitude (RTOL) leaves room for that and still catches any
wrong coefficient, index or sigma, which show up at 1e-3 or worse.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from sdc.runtime.schedulers import SCHEDULERS, SchedulerError, make_scheduler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()  # from_config warns about every foreign key
# diffusers calls np.array(tensor) on schedule tables, which numpy 2 flags; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RTOL = 1e-5
SHAPE = (2, 4, 8, 8)

# What the artifact ships: Stable Diffusion v1.5's scheduler_config.json.
SD15 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    "prediction_type": "epsilon", "trained_betas": None,
}

ORACLE = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler", "dpmpp-2m": "DPMSolverMultistepScheduler",
    "dpmpp-2m-karras": "DPMSolverMultistepScheduler", "lms": "LMSDiscreteScheduler",
    "ddpm": "DDPMScheduler",
}
# What the CLI name itself fixes, passed to from_config as overrides.
ORACLE_KWARGS = {"dpmpp-2m": {"use_karras_sigmas": False},
                 "dpmpp-2m-karras": {"use_karras_sigmas": True}}

# Variants layered over SD15 ("class_defaults" replaces it: every key takes the class default).
VARIANTS = {
    "sd15": {},
    "v_prediction": {"prediction_type": "v_prediction"},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "leading": {"timestep_spacing": "leading"},
    "alpha_one": {"set_alpha_to_one": True},
    "clip": {"clip_sample": True, "clip_sample_range": 0.8},
    "no_offset": {"steps_offset": 0},
    "sample_pred": {"prediction_type": "sample"},
    "squaredcos": {"beta_schedule": "squaredcos_cap_v2"},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "trained_betas": {"trained_betas": (np.linspace(0.0009, 0.11, 1000) ** 2).tolist()},
    "zero_snr": {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                 "timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
    # not DPM options, yet diffusers' DPM karras reads them off the stored config
    "karras_range": {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
    "final_sigma_min": {"final_sigmas_type": "sigma_min"},
    "dpm_heun_no_lower": {"solver_type": "heun", "lower_order_final": False},
    "euler_at_final": {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
    "lambda_clipped": {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    "prk": {"skip_prk_steps": False},
    # keys listed in _use_default_values take the target class's default
    "use_default_values": {"timestep_spacing": "trailing", "steps_offset": 0,
                           "_use_default_values": ["timestep_spacing"]},
    "class_defaults": None,
}
# (name, variant) pairs diffusers itself cannot run either: the runtime refuses them up front.
REFUSED = {("pndm", "sample_pred"), ("euler-a", "sample_pred")}
# Where diffusers' float32 euler-a goes NaN: sigma_down = sqrt(to^2 - up^2) cancels to a negative
# number when sigma_max (20291 with squaredcos betas) dwarfs the next sigma. The runtime uses the
# exact rewrite to^2 / from; the test checks the reference still fails and ours stays finite.
REFERENCE_NAN = {("euler-a", "squaredcos", 4), ("euler-a", "lambda_clipped", 4)}
# Zero-SNR betas start at sigma_max = 4096: the first step shrinks |x| ~ 1e4 to ~ 10, so the
# float32 reference carries ~1e-7 * 1e4 absolute error into every later step. There each step is
# checked from the reference's own input (teacher forcing) instead of free-running.
TEACHER_FORCED = {"zero_snr"}

CASES = [("sd15", n) for n in (1, 4, 10, 25, 50)]
CASES += [(v, n) for v in VARIANTS if v != "sd15" for n in (4, 25)]
CASES += [("final_sigma_min", 10), ("dpm_heun_no_lower", 10)]


def config_of(variant: str) -> dict:
    extra = VARIANTS[variant]
    return {} if extra is None else {**SD15, **extra}


def gauss_legendre_quad(f, a, b, epsrel=None):
    """Stand-in for scipy.integrate.quad (diffusers' LMS integrates its Lagrange polynomials with
    it): 8-point Gauss-Legendre is exact for polynomials up to degree 15, and LMS's are cubic."""
    nodes, weights = np.polynomial.legendre.leggauss(8)
    half, mid = (b - a) / 2, (a + b) / 2
    return half * sum(w * float(f(half * x + mid)) for x, w in zip(nodes, weights)), 0.0


@pytest.fixture(scope="module", autouse=True)
def lms_oracle_without_scipy():
    """diffusers exports a scipy-requiring dummy for LMSDiscreteScheduler when scipy is missing
    (it is not a dependency here); the real class lives in its module and only lacks
    `integrate.quad`, which is supplied for the duration of this module."""
    from diffusers.schedulers import scheduling_lms_discrete as lms

    with pytest.MonkeyPatch.context() as mp:
        if not hasattr(lms, "integrate"):
            mp.setattr(lms, "integrate", SimpleNamespace(quad=gauss_legendre_quad), raising=False)
        yield


def oracle(name: str, config: dict):
    if name == "lms":
        from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler as cls
    else:
        cls = getattr(diffusers, ORACLE[name])
    return cls.from_config(config, **ORACLE_KWARGS.get(name, {}))


def fake_unet(x: np.ndarray, t, w: np.ndarray) -> np.ndarray:
    """Deterministic stand-in for the UNet: depends on the input and (smoothly) on t."""
    t = float(t)
    return (0.1 * x + np.sin(t / 97.0) * w[0] + np.cos(t / 331.0) * w[1]).astype(np.float32)


def rel_err(ours: np.ndarray, ref, operand=None) -> float:
    """max |ours - ref| over the largest magnitude involved: the reference's output, and the
    step's input `operand` when given (float32 rounds relative to the operands, so a step that
    shrinks a huge sample, e.g. from sigma_max = 4096 with zero-SNR betas, is judged on that)."""
    ref = np.asarray(ref, dtype=np.float64)
    scale = np.max(np.abs(ref))
    if operand is not None:
        scale = max(scale, np.max(np.abs(np.asarray(operand, np.float64))))
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / max(scale, 1e-30))


def check_timesteps(ours: np.ndarray, ref) -> None:
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    if np.all(ref == np.round(ref)) and np.all(ours == np.round(ours)):
        np.testing.assert_array_equal(ours, ref)
    else:  # fractional (Karras) timesteps: a few float32 ulps at t ~ 1000 (6e-5 each)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=2.5e-4)


def run_loop(ours, theirs, x, timesteps_ours, timesteps_ref, seed: int,
             teacher_forcing: bool = False) -> float:
    """Denoise from `x` on both sides; every intermediate is compared. Returns the max rel error.
    With teacher_forcing, each step of ours starts from the reference's sample."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    # euler-a: diffusers draws torch.randn(shape, generator=g) inside step(); draw the same stream
    # here and hand it to the numpy side explicitly.
    gen_ref, gen_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    x_ours, x_ref = x.copy(), torch.from_numpy(x.copy())
    worst = 0.0
    assert len(timesteps_ours) == len(timesteps_ref)
    for t_ours, t_ref in zip(timesteps_ours, timesteps_ref):
        if teacher_forcing:
            x_ours = x_ref.numpy().copy()
        in_ours = ours.scale_model_input(x_ours, t_ours)
        in_ref = theirs.scale_model_input(x_ref, t_ref)
        assert in_ours.dtype == np.float32
        worst = max(worst, rel_err(in_ours, in_ref.numpy()))
        out_ours = fake_unet(in_ours, t_ours, w)
        out_ref = torch.from_numpy(fake_unet(in_ref.numpy(), t_ref, w))
        noise = torch.randn(SHAPE, generator=gen_ours).numpy() if ours.stochastic else None
        x_ours = ours.step(out_ours, t_ours, x_ours, noise=noise)
        kwargs = {"generator": gen_ref} if ours.stochastic else {}
        x_in_ref = x_ref
        x_ref = theirs.step(out_ref, t_ref, x_ref, **kwargs).prev_sample
        assert x_ours.dtype == np.float32 and x_ours.shape == SHAPE
        err = rel_err(x_ours, x_ref.numpy(), operand=x_in_ref.numpy())
        assert err <= RTOL, f"step at t={float(t_ours)}: rel error {err:.2e}"
        worst = max(worst, err)
    assert worst <= RTOL, f"rel error {worst:.2e}"
    return worst


def txt2img_error(name: str, variant: str, steps: int, seed: int = 0) -> float:
    config = config_of(variant)
    ours, theirs = make_scheduler(name, config), oracle(name, config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    check_timesteps(ours.timesteps, theirs.timesteps)
    if len(theirs.timesteps) > 1 and theirs.timesteps[0] == theirs.timesteps[1]:
        # Karras timesteps rounded to integers can repeat at the top. diffusers' first-step
        # lookup then takes the second match and runs off the end of its sigmas (IndexError);
        # the runtime starts a top-down run at 0, which is the reference with begin index 0.
        theirs.set_begin_index(0)
    assert ours.order == theirs.order
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
    latents = np.random.default_rng(seed + 1).standard_normal(SHAPE).astype(np.float32)
    x = (latents * np.float32(ours.init_noise_sigma)).astype(np.float32)
    assert rel_err(x, latents * float(theirs.init_noise_sigma)) <= 1e-6
    if (name, variant, steps) in REFERENCE_NAN:
        with pytest.raises(AssertionError, match="rel error nan"):  # if diffusers gets fixed,
            run_loop(ours, theirs, x, ours.timesteps, theirs.timesteps, seed)  # drop the entry
        ours.set_timesteps(steps)
        for t in ours.timesteps:
            noise = np.ones(SHAPE, np.float32)
            x = ours.step(fake_unet(ours.scale_model_input(x, t), t, np.ones((2, *SHAPE))), t, x,
                          noise=noise)
            assert np.all(np.isfinite(x))
        return 0.0
    return run_loop(ours, theirs, x, ours.timesteps, theirs.timesteps, seed,
                    teacher_forcing=variant in TEACHER_FORCED)


@pytest.mark.parametrize("variant,steps", CASES, ids=[f"{v}-{n}" for v, n in CASES])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_loop_matches_diffusers(name, variant, steps):
    if (name, variant) in REFUSED:
        with pytest.raises(ValueError, match="prediction_type"):
            make_scheduler(name, config_of(variant))
        with pytest.raises((ValueError, NotImplementedError)):  # diffusers fails too, later
            theirs = oracle(name, config_of(variant))
            theirs.set_timesteps(steps)
            x = torch.zeros(SHAPE)
            theirs.step(x, theirs.timesteps[0], x)
        return
    txt2img_error(name, variant, steps)


def img2img_error(name: str, steps: int, strength: float, seed: int = 0) -> float:
    ours, theirs = make_scheduler(name, SD15), oracle(name, SD15)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    ts_ours = ours.img2img_timesteps(steps, strength)
    # StableDiffusionImg2ImgPipeline.get_timesteps
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    ts_ref = theirs.timesteps[t_start * theirs.order:]
    if hasattr(theirs, "set_begin_index"):
        theirs.set_begin_index(t_start * theirs.order)
    check_timesteps(ts_ours, ts_ref)
    # prepare_latents: noise the image latents to the first img2img timestep
    rng = np.random.default_rng(seed + 2)
    image, noise = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    x = ours.add_noise(image, noise, ts_ours[:1])
    x_ref = theirs.add_noise(torch.from_numpy(image), torch.from_numpy(noise), ts_ref[:1])
    assert x.dtype == np.float32
    err = rel_err(x, x_ref.numpy())
    assert err <= RTOL
    return max(err, run_loop(ours, theirs, x, ts_ours, ts_ref, seed))


@pytest.mark.parametrize("steps,strength", [(10, 0.3), (25, 0.75), (10, 1.0)])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_img2img_matches_diffusers(name, steps, strength):
    img2img_error(name, steps, strength)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_add_noise_by_timestep_lookup(name):
    """Without a begin index (training-style use), the sigma is found from the timestep value."""
    ours, theirs = make_scheduler(name, SD15), oracle(name, SD15)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    rng = np.random.default_rng(3)
    image, noise = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    for k in (0, 3, len(ours.timesteps) - 1):
        got = ours.add_noise(image, noise, ours.timesteps[k])
        ref = theirs.add_noise(torch.from_numpy(image), torch.from_numpy(noise),
                               theirs.timesteps[k:k + 1])
        assert rel_err(got, ref.numpy()) <= RTOL


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_set_timesteps_resets_state(name):
    """A second run on the same object (multistep history, step index) equals a fresh one."""
    s = make_scheduler(name, SD15)
    w = np.random.default_rng(4).standard_normal((2, *SHAPE)).astype(np.float32)
    results = []
    for steps in (7, 5, 7):  # a different run in between, left unfinished
        s.set_timesteps(steps)
        x = np.ones(SHAPE, np.float32) * np.float32(s.init_noise_sigma)
        timesteps = s.timesteps if steps == 7 else s.timesteps[:3]
        for i, t in enumerate(timesteps):
            noise = np.full(SHAPE, 0.01 * i, np.float32) if s.stochastic else None
            x = s.step(fake_unet(s.scale_model_input(x, t), t, w), t, x, noise=noise)
        results.append(x)
    np.testing.assert_array_equal(results[0], results[2])


@pytest.mark.parametrize("name,options,match", [
    ("ddim", {"thresholding": True}, "thresholding"),
    ("ddim", {"timestep_spacing": "sideways"}, "timestep_spacing"),
    ("ddim", {"beta_schedule": "cosine"}, "beta_schedule"),
    ("pndm", {"prediction_type": "sample"}, "prediction_type"),
    ("euler", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("euler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
    ("euler", {"timestep_type": "continuous"}, "timestep_type"),
    ("euler", {"final_sigmas_type": "sigma_max"}, "final_sigmas_type"),
    ("euler-a", {"prediction_type": "sample"}, "prediction_type"),
    ("lms", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("dpmpp-2m", {"thresholding": True}, "thresholding"),
    ("dpmpp-2m", {"use_lu_lambdas": True}, "use_lu_lambdas"),
    ("dpmpp-2m-karras", {"use_flow_sigmas": True}, "use_flow_sigmas"),
    ("dpmpp-2m", {"variance_type": "learned_range"}, "variance_type"),
    ("dpmpp-2m", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ("dpmpp-2m", {"solver_type": "rk4"}, "solver_type"),
    ("ddpm", {"variance_type": "learned_log"}, "variance_type"),
    ("ddpm", {"variance_type": "fixed_small", "beta_schedule": "sigmoid"}, "beta_schedule"),
    ("ddpm", {"prediction_type": "flow_prediction"}, "prediction_type"),
])
def test_unsupported_options_are_refused(name, options, match):
    with pytest.raises(SchedulerError, match=match) as info:
        make_scheduler(name, {**SD15, **options})
    assert name in str(info.value) and "not supported" in str(info.value)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown scheduler 'heun'") as info:
        make_scheduler("heun", SD15)
    assert all(name in str(info.value) for name in SCHEDULERS)
    assert isinstance(info.value, SchedulerError)
    assert set(SCHEDULERS) == {"ddim", "pndm", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras",
                               "lms", "ddpm"}


def test_misuse_is_reported():
    s = make_scheduler("euler-a", SD15)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999.0, x, noise=x)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.img2img_timesteps(10, 0.5)
    with pytest.raises(ValueError, match="positive integer"):
        s.set_timesteps(0)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="needs `noise`"):
        s.step(x, s.timesteps[0], x)
    with pytest.raises(ValueError, match="strength"):
        s.img2img_timesteps(10, 1.5)
    with pytest.raises(ValueError, match="not one of"):
        s.scale_model_input(x, 12.5)
    with pytest.raises(ValueError, match="skip_prk_steps"):
        make_scheduler("pndm", {**SD15, "skip_prk_steps": False}).set_timesteps(3)


def test_import_is_torch_free():
    code = (
        "import sys\n"
        "import sdc.runtime.schedulers as s\n"
        f"cfg = {SD15!r}\n"
        "for name in s.SCHEDULERS:\n"
        "    sch = s.make_scheduler(name, cfg)\n"
        "    sch.set_timesteps(4)\n"
        "heavy = [m for m in ('torch', 'diffusers', 'scipy', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------
# DDPM, the way DeepFloyd IF samples with it
# --------------------------------------------------------------------------------------------
#
# Tolerance: the same RTOL as above (1e-5 of the largest magnitude among the step's input and
# output, i.e. ~1e-5 absolute on these unit-scale samples). Measured over every case below: max
# abs difference 1.2e-6 in 10 and 27 steps, 1.7e-6 in IF's 100 (rel <= 8e-7), so RTOL leaves a 5x
# margin and still catches a wrong coefficient, variance or prev_t (1e-3 or worse). Two float32
# effects of the reference are reproduced rather than tolerated, since near t = 0, where
# 1 - alpha_bar and beta = 1 - alpha are ~1e-4, each is 2e-5 to 4e-5 on its own: the alpha_bar
# table and the transition's alpha/beta are rounded to float32 as the reference holds them. And
# thresholding takes torch.quantile's float32 rank (numpy's quantile is 5e-6 relative off it at
# n = 12288; ours is 6e-8, see the thresholding test).

# DeepFloyd/IF-I-XL-v1.0's scheduler_config.json (stage II's differs in sample_max_value).
IF_STAGE_I = {
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.16.0", "beta_end": 0.02,
    "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "clip_sample": True,
    "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.95, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.5, "steps_offset": 0,
    "thresholding": True, "trained_betas": None, "variance_type": "learned_range",
}
IF_STAGE_II = {**IF_STAGE_I, "sample_max_value": 1.0}
# stage II's image_noising_scheduler: noises the upscaled stage-I image to noise_level 250
IF_NOISING = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2",
              "clip_sample": True, "num_train_timesteps": 1000, "variance_type": "fixed_small"}
IF_SHAPE = (2, 3, 16, 16)  # IF samples pixels: 3 channels, a batch of two

# name -> (config, overrides); overrides go to make_scheduler(**) and from_config(**) alike.
DDPM_CASES = {
    "if_stage_1": (IF_STAGE_I, {}),
    # how DeepFloyd LoRAs are sampled: the variance half of the output is dropped
    "if_stage_1_fixed_small": (IF_STAGE_I, {"variance_type": "fixed_small"}),
    "if_stage_2": (IF_STAGE_II, {}),
    # trailing: the last step is at t = 99 > 0, noised with prev_t = -1 (posterior var clamped)
    "if_trailing": (IF_STAGE_I, {"timestep_spacing": "trailing"}),
    "linear_fixed_small": ({"beta_schedule": "linear", "variance_type": "fixed_small"}, {}),
    "v_prediction": ({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                      "beta_end": 0.012, "prediction_type": "v_prediction",
                      "timestep_spacing": "trailing", "clip_sample": False}, {}),
    "sample_fixed_large_linspace": ({"prediction_type": "sample", "variance_type": "fixed_large",
                                     "timestep_spacing": "linspace",
                                     "clip_sample_range": 2.0}, {}),
    "fixed_small_log_offset": ({**IF_STAGE_I, "variance_type": "fixed_small_log",
                                "steps_offset": 1, "dynamic_thresholding_ratio": 0.995}, {}),
    "learned": ({**IF_STAGE_I, "variance_type": "learned"}, {}),
}
DDPM_LOOPS = [(c, n) for c in DDPM_CASES for n in (10, 27)] + [("if_stage_1", 100)]


def fake_if_unet(x: np.ndarray, t, w: np.ndarray) -> np.ndarray:
    """A 2C-channel output like IF's UNets: fake_unet's prediction, then a variance half in
    (0, 0.01), a positive variance of a plausible size for variance_type 'learned'."""
    half = 0.005 * (1.0 + np.tanh(0.5 * x + np.cos(float(t) / 53.0) * w[0]))
    return np.concatenate([fake_unet(x, t, w), half.astype(np.float32)], axis=1)


def fake_if_unet_signed(x: np.ndarray, t, w: np.ndarray) -> np.ndarray:
    """The same with the variance half over all of (-1, 1), learned_range's interpolation
    value (-1: the posterior variance, 1: beta)."""
    out = fake_if_unet(x, t, w)
    out[:, x.shape[1]:] = 200.0 * out[:, x.shape[1]:] - 1.0
    return out


def ddpm_pair(case: str):
    config, overrides = DDPM_CASES[case]
    return (make_scheduler("ddpm", config, **overrides),
            diffusers.DDPMScheduler.from_config(config, **overrides))


def ddpm_loop(ours, theirs, steps: int, seed: int = 0, model=None) -> tuple[float, np.ndarray]:
    """IFPipeline's loop on both sides with the same noise; (max rel error, our last sample)."""
    if model is None:
        model = fake_if_unet if ours.config["variance_type"] == "learned" else fake_if_unet_signed
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    check_timesteps(ours.timesteps, theirs.timesteps)
    assert ours.init_noise_sigma == float(theirs.init_noise_sigma) == 1.0
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((2, *IF_SHAPE)).astype(np.float32)
    x = rng.standard_normal(IF_SHAPE).astype(np.float32)
    c = IF_SHAPE[1]
    # diffusers draws randn_tensor(shape, generator) = torch.randn on CPU where t > 0; the same
    # draws from an identically seeded generator go to ours, and None where t = 0
    gen_ref, gen_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    x_ours, x_ref = x.copy(), torch.from_numpy(x.copy())
    worst = 0.0
    for t_ours, t_ref in zip(ours.timesteps, theirs.timesteps):
        assert ours.scale_model_input(x_ours, t_ours) is x_ours
        out_ours = model(x_ours, t_ours, w)  # always 2C: ours drops what it does not use
        out_ref = torch.from_numpy(model(x_ref.numpy(), t_ref, w))
        if theirs.config.variance_type not in ("learned", "learned_range"):
            out_ref = out_ref[:, :c]  # IFPipeline splits the variance half off itself
        noise = torch.randn(IF_SHAPE, generator=gen_ours).numpy() if t_ours > 0 else None
        x_in_ref = x_ref
        x_ours = ours.step(out_ours, t_ours, x_ours, noise=noise)
        x_ref = theirs.step(out_ref, t_ref, x_ref, generator=gen_ref).prev_sample
        assert x_ours.dtype == np.float32 and x_ours.shape == IF_SHAPE
        err = rel_err(x_ours, x_ref.numpy(), operand=x_in_ref.numpy())
        assert err <= RTOL, f"step at t={float(t_ours)}: rel error {err:.2e}"
        worst = max(worst, err)
    assert torch.equal(gen_ours.get_state(), gen_ref.get_state())  # drawn on the same steps
    return worst, x_ours


@pytest.mark.parametrize("case,steps", DDPM_LOOPS, ids=[f"{c}-{n}" for c, n in DDPM_LOOPS])
def test_ddpm_loop_matches_diffusers(case, steps, monkeypatch):
    ours, theirs = ddpm_pair(case)
    # record the reference's thresholds: the quantile must land inside (1, sample_max_value) on
    # some steps, or the test would not exercise it
    quantiles = []
    threshold = diffusers.DDPMScheduler._threshold_sample

    def spy(self, x0):
        flat = x0.reshape(x0.shape[0], -1).abs()
        quantiles.extend(torch.quantile(flat, self.config.dynamic_thresholding_ratio, 1).tolist())
        return threshold(self, x0)

    monkeypatch.setattr(diffusers.DDPMScheduler, "_threshold_sample", spy)
    ddpm_loop(ours, theirs, steps)
    if ours.config["thresholding"]:
        assert len(quantiles) == steps * IF_SHAPE[0]
        if ours.config["sample_max_value"] > 1:
            assert any(1 < q < ours.config["sample_max_value"] for q in quantiles)


def test_ddpm_fixed_small_ignores_the_variance_half():
    """variance_type fixed_small on a 2C output == the same run on its first C channels, and the
    second half (what a LoRA'd IF model's variance head says) changes nothing."""
    results = []
    for model in (fake_if_unet_signed, lambda x, t, w: fake_if_unet_signed(x, t, w)[:, :3],
                  lambda x, t, w: fake_if_unet_signed(x, t, w) * np.float32([1] * 3 + [7] * 3)
                  .reshape(1, 6, 1, 1)):
        ours, theirs = ddpm_pair("if_stage_1_fixed_small")
        results.append(ddpm_loop(ours, theirs, 10, model=model)[1])
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])
    learned, _ = ddpm_pair("if_stage_1")
    assert learned.config["variance_type"] == "learned_range"


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 256, 256), (3, 3, 7, 5)])
@pytest.mark.parametrize("ratio,max_value", [(0.95, 1.5), (0.95, 1.0), (0.995, 3.0), (0.5, 1.5)])
def test_ddpm_thresholding_matches_torch_quantile(shape, ratio, max_value):
    """Dynamic thresholding alone against the reference's _threshold_sample (float32 torch).
    Outputs are in [-1, 1]: float32 rounds them by up to 3e-8 and the quantile is 6e-8 relative
    off (the float32 lerp); measured <= 9e-8, so 2e-7. numpy's float64-rank quantile would be
    ~5e-6 off here."""
    config = {"thresholding": True, "dynamic_thresholding_ratio": ratio,
              "sample_max_value": max_value}
    ours = make_scheduler("ddpm", config)
    theirs = diffusers.DDPMScheduler.from_config(config)
    rng = np.random.default_rng(5)
    for scale in (0.4, 0.7, 1.0, 1.6):  # quantiles below 1, inside (1, max) and above max
        x0 = (rng.standard_normal(shape) * scale).astype(np.float32)
        x0[0] *= 1.3  # each sample of the batch has its own threshold
        ref = theirs._threshold_sample(torch.from_numpy(x0)).numpy()
        got = ours._threshold(x0.astype(np.float64))
        assert np.max(np.abs(got - ref)) <= 2e-7


def test_ddpm_fixed_large_log_is_finite_where_the_reference_is_nan():
    """diffusers takes sqrt(log(beta)) for fixed_large_log (NaN on every noised step); the
    runtime uses the log-variance's meaning, std sqrt(beta), i.e. fixed_large. If diffusers gets
    fixed, the first assertion fails: then compare step by step instead."""
    config = {**DDPM_CASES["sample_fixed_large_linspace"][0], "variance_type": "fixed_large_log"}
    ours = make_scheduler("ddpm", config)
    theirs = diffusers.DDPMScheduler.from_config(config)
    with pytest.raises(AssertionError, match="rel error nan"):
        ddpm_loop(ours, theirs, 10)
    large = {**config, "variance_type": "fixed_large"}
    _, x_log = ddpm_loop(ours, diffusers.DDPMScheduler.from_config(large), 10)
    _, x_large = ddpm_loop(make_scheduler("ddpm", large),
                           diffusers.DDPMScheduler.from_config(large), 10)
    assert np.all(np.isfinite(x_log))
    np.testing.assert_array_equal(x_log, x_large)


@pytest.mark.parametrize("timestep", [250, [250, 250], np.array([250, 40]), 999, 0])
def test_ddpm_add_noise_matches_diffusers(timestep):
    """IF stage II noises the upscaled stage-I image with its image_noising_scheduler, which
    never had set_timesteps(): noise_level 250 by default, one per batch entry."""
    ours = make_scheduler("ddpm", IF_NOISING)
    theirs = diffusers.DDPMScheduler.from_config(IF_NOISING)
    rng = np.random.default_rng(6)
    image, noise = rng.standard_normal((2, *IF_SHAPE)).astype(np.float32)
    got = ours.add_noise(image, noise, timestep)
    ref = theirs.add_noise(torch.from_numpy(image), torch.from_numpy(noise),
                           torch.tensor(np.atleast_1d(timestep), dtype=torch.long))
    assert got.dtype == np.float32
    assert rel_err(got, ref.numpy()) <= RTOL


def test_ddpm_misuse_is_reported():
    ours = make_scheduler("ddpm", IF_STAGE_I)
    x = np.zeros(IF_SHAPE, np.float32)
    out = np.zeros((2, 6, 16, 16), np.float32)
    with pytest.raises(SchedulerError, match="set_timesteps"):
        ours.step(out, 999, x, noise=x)
    ours.set_timesteps(10)
    with pytest.raises(SchedulerError, match="needs `noise`"):
        ours.step(out, 900, x)
    with pytest.raises(SchedulerError, match="noise of shape"):
        ours.step(out, 900, x, noise=out)
    with pytest.raises(SchedulerError, match="2 x 3 channels"):
        ours.step(out[:, :3], 900, x, noise=x)  # learned_range without the variance half
    with pytest.raises(SchedulerError, match="model output of shape"):
        ours.step(out[:, :5], 900, x, noise=x)
    with pytest.raises(SchedulerError, match="not one of"):
        ours.step(out, 901, x, noise=x)
    assert ours.step(out, 0, x).shape == IF_SHAPE  # t = 0 adds no noise: none needed
    with pytest.raises(SchedulerError, match="num_inference_steps 1001"):
        ours.set_timesteps(1001)
    for bad in (1000, -1, [250, 1000], np.nan, 250.5, "250", None):
        with pytest.raises(SchedulerError, match="add_noise"):
            ours.add_noise(x, x, bad)


@pytest.mark.parametrize("options,match", [
    ({"thresholding": "true"}, "thresholding='true', expected bool"),
    ({"clip_sample": 1}, "clip_sample=1, expected bool"),
    ({"dynamic_thresholding_ratio": "0.95"}, "dynamic_thresholding_ratio='0.95', expected float"),
    ({"dynamic_thresholding_ratio": 1.5}, "expected a quantile"),
    ({"dynamic_thresholding_ratio": math.nan}, "expected float"),
    ({"sample_max_value": None}, "sample_max_value=None, expected float"),
    ({"sample_max_value": 0.0}, "sample_max_value=0.0, expected a number > 0"),
    ({"clip_sample_range": -1.0}, "clip_sample_range=-1.0, expected a number > 0"),
    ({"variance_type": None}, "variance_type=None, expected str"),
    ({"variance_type": ["learned_range"]}, "expected str"),
])
def test_ddpm_options_are_type_checked(options, match):
    with pytest.raises(SchedulerError, match=re.escape(match) if "=" in match else match):
        make_scheduler("ddpm", {**IF_STAGE_I, **options})
    # the same value given as an override is checked the same way
    with pytest.raises(SchedulerError, match=re.escape(match) if "=" in match else match):
        make_scheduler("ddpm", IF_STAGE_I, **options)


def test_overrides_win_like_from_config():
    # over the dict and over _use_default_values, like from_config(config, **kwargs)
    cfg = {**IF_STAGE_I, "_use_default_values": ["variance_type"]}
    ours = make_scheduler("ddpm", cfg, variance_type="fixed_small")
    theirs = diffusers.DDPMScheduler.from_config(cfg, variance_type="fixed_small")
    assert ours.config["variance_type"] == theirs.config.variance_type == "fixed_small"
    assert make_scheduler("ddpm", cfg).config["variance_type"] == "fixed_small"  # the default
    assert make_scheduler("ddpm", IF_STAGE_I).config["variance_type"] == "learned_range"
    # the CLI name's own meaning still wins, and an option the class lacks is a caller's bug
    karras = make_scheduler("dpmpp-2m-karras", SD15, use_karras_sigmas=False)
    assert karras.config["use_karras_sigmas"] is True
    with pytest.raises(SchedulerError, match="has no option variance"):
        make_scheduler("ddim", SD15, variance="fixed_small")
