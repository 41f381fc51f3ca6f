"""sdc.runtime.schedulers against diffusers, the oracle: same config dict, same inputs, a fake
deterministic "UNet", and the whole sampling loop compared step by step (timesteps,
init_noise_sigma, scale_model_input, every prev_sample), plus img2img, add_noise, state reset,
the refusals, and the torch-free import.

Tolerance: the numpy side computes in float64 from float32-quantized schedule tables, diffusers
computes in float32 torch. One float32 operation is off by up to 2**-24 ~ 6e-8 relative; a step is
tens of operations and errors carry over up to 50 steps, so the reference itself sits ~1e-6 from
the exact result. 1e-5 of the largest magnitude (RTOL) leaves room for that and still catches any
wrong coefficient, index or sigma, which show up at 1e-3 or worse.
"""

from __future__ import annotations

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
])
def test_unsupported_options_are_refused(name, options, match):
    with pytest.raises(ValueError, match=match) as info:
        make_scheduler(name, {**SD15, **options})
    assert name in str(info.value) and "not supported" in str(info.value)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown scheduler 'heun'") as info:
        make_scheduler("heun", SD15)
    assert all(name in str(info.value) for name in SCHEDULERS)
    assert isinstance(info.value, SchedulerError)
    assert set(SCHEDULERS) == {"ddim", "pndm", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras",
                               "lms"}


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
