"""keystep.runtime.schedulers (pure numpy) against the real diffusers schedulers.

Each case runs whole sampling loops through both implementations side by side, each fed its own
previous output (so errors compound), with a "model" that is a deterministic function of (x, t)."""

from __future__ import annotations

import ast
import inspect
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from keystep.runtime.schedulers import (CLASS_TO_NAME, SCHEDULERS, DDIMScheduler, DDPMScheduler,  # noqa: E402
                                        DPMSolverMultistepScheduler, EulerDiscreteScheduler, SchedulerConfigError,
                                        class_name_for_scheduler, make_scheduler, scheduler_name_for_class)

ATOL, RTOL = 1e-5, 1e-4
# schedulers with a diffusers counterpart (RespacedDDIMScheduler is DiT's own: test_scheduler_respaced_ddim.py)
DIFFUSERS_BACKED = sorted(n for n, c in SCHEDULERS.items() if hasattr(diffusers, c.class_name))
STEPS = (1, 2, 10, 50)
SHAPE = (2, 4, 8, 8)

DIT = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000, steps_offset=1)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def fake_model(x: np.ndarray, t, out_channels: int | None = None) -> np.ndarray:
    """Deterministic stand-in for a denoiser: depends on the sample and on t."""
    x = np.asarray(x, dtype=np.float64)
    eps = 0.1 * x + math.sin(float(t) / 100.0) + 0.05 * np.cos(x)
    if out_channels and out_channels > x.shape[1]:  # extra "learned variance" channels in (0, 1)
        eps = np.concatenate([eps, 0.5 + 0.5 * np.tanh(0.3 * x + math.cos(float(t) / 50.0))], axis=1)
    return eps.astype(np.float32)


def ref_class(ours) -> type:
    return getattr(diffusers, ours.class_name)


def assert_close(a, b, what, extra_atol=0.0):
    b = b.numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if not np.allclose(a, b, atol=ATOL + extra_atol, rtol=RTOL):
        err = np.abs(a.astype(np.float64) - b)
        raise AssertionError(f"{what}: max abs err {err.max():.3e} (ref max {np.abs(b).max():.3e})")


def check_tables(ours, ref):
    assert_close(ours.alphas_cumprod, ref.alphas_cumprod, "alphas_cumprod")
    ts_ref = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ts_ref.dtype, (ours.timesteps.dtype, ts_ref.dtype)
    if ts_ref.dtype.kind in "iu":
        np.testing.assert_array_equal(ours.timesteps, ts_ref)
    else:
        np.testing.assert_allclose(ours.timesteps, ts_ref, rtol=1e-5, atol=1e-4)
    assert isinstance(ours.init_noise_sigma, float)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    if hasattr(ref, "sigmas"):
        assert_close(ours.sigmas, ref.sigmas, "sigmas")


def run_loop(ours, ref, n, *, seed=0, out_channels=None, ddpm_noise=False, eta=0.0, extra_atol=0.0):
    """Sample with both schedulers for n steps; compare every step's output."""
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    check_tables(ours, ref)
    x = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32) * np.float32(ours.init_noise_sigma)
    a, b = x.copy(), torch.from_numpy(x.copy())
    gen_ref = torch.Generator().manual_seed(seed)
    gen_ours = torch.Generator().manual_seed(seed)
    outs = []
    for i, t in enumerate(ours.timesteps):
        t_ref = ref.timesteps[i]
        a_in = ours.scale_model_input(a, t)
        b_in = ref.scale_model_input(b, t_ref)
        assert_close(a_in, b_in, f"scale_model_input step {i} (t={t})", extra_atol=extra_atol)
        m_a, m_b = fake_model(a_in, t, out_channels), torch.from_numpy(fake_model(b_in.numpy(), t, out_channels))
        if ddpm_noise:
            # diffusers draws noise only for t > 0; feed ours the same draws explicitly
            noise = torch.randn(SHAPE, generator=gen_ours).numpy() if int(t) > 0 else None
            a = ours.step(m_a, t, a, noise=noise)
            b = ref.step(m_b, t_ref, b, generator=gen_ref).prev_sample
        elif eta:
            noise = torch.randn(SHAPE, generator=gen_ours)
            a = ours.step(m_a, t, a, noise=noise.numpy(), eta=eta)
            b = ref.step(m_b, t_ref, b, eta=eta, variance_noise=noise).prev_sample
        else:
            a = ours.step(m_a, t, a)
            b = ref.step(m_b, t_ref, b).prev_sample
        assert a.dtype == np.float32
        assert_close(a, b, f"step {i}/{n} (t={t})", extra_atol=extra_atol)
        outs.append(a)
    return outs


def check_config(name, cfg, steps=STEPS, **kw):
    ours = SCHEDULERS[name](**cfg)
    ref = getattr(diffusers, ours.class_name)(**cfg)
    assert_close(ours.alphas_cumprod, ref.alphas_cumprod, "alphas_cumprod (init)")
    # one scheduler object samples several times: set_timesteps must reset all multistep state
    for n in steps:
        run_loop(ours, ref, n, **kw)


# ----------------------------------------------------------------------------------------------- DDIM

DDIM_CASES = {
    "dit": dict(DIT, clip_sample=False),
    "dit-clip": dict(DIT, clip_sample=True),
    "dit-clip-range": dict(DIT, clip_sample=True, clip_sample_range=0.5),
    "sd-leading": dict(SD, clip_sample=False, set_alpha_to_one=False),
    "sd-trailing": dict(SD, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing"),
    "sd-linspace": dict(SD, clip_sample=False, timestep_spacing="linspace"),
    "sd-vpred-zsnr": dict(SD, clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                          timestep_spacing="trailing"),
    "cos-sample": dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=True),
    "thresholding": dict(DIT, thresholding=True, sample_max_value=1.5),
    "trained-betas": dict(trained_betas=list(np.linspace(1e-4, 0.03, 500)), num_train_timesteps=500, clip_sample=False),
}


@pytest.mark.parametrize("case", sorted(DDIM_CASES))
def test_ddim_matches_diffusers(case):
    check_config("ddim", DDIM_CASES[case])


def test_ddim_eta_with_explicit_noise():
    check_config("ddim", dict(SD, clip_sample=False), steps=(2, 10), eta=1.0)


# ----------------------------------------------------------------------------------------------- DPM++ 2M

DPM_CASES = {
    "dit": dict(DIT),
    "sd": dict(SD),
    "sd-leading": dict(SD, timestep_spacing="leading"),
    "sd-trailing": dict(SD, timestep_spacing="trailing"),
    "heun": dict(SD, solver_type="heun"),
    "no-lower-order-final": dict(DIT, lower_order_final=False),
    "euler-at-final": dict(DIT, euler_at_final=True, lower_order_final=False),
    "sigma-min": dict(SD, final_sigmas_type="sigma_min", lower_order_final=False),
    "sigma-min-lof": dict(SD, final_sigmas_type="sigma_min"),
    "order1": dict(DIT, solver_order=1),
    "order3": dict(SD, solver_order=3),
    "vpred": dict(SD, prediction_type="v_prediction"),
    "sample-pred": dict(DIT, prediction_type="sample", solver_type="heun"),
    "karras": dict(SD, use_karras_sigmas=True),
    "exponential": dict(SD, use_exponential_sigmas=True),
    "lu-lambdas": dict(SD, use_lu_lambdas=True),
    "lambda-clip": dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    "zsnr-vpred": dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                       timestep_spacing="trailing"),
    "thresholding": dict(DIT, thresholding=True, sample_max_value=2.0),
    "deis-remap": dict(DIT, algorithm_type="deis", solver_type="logrho", final_sigmas_type="sigma_min"),
}


@pytest.mark.parametrize("case", sorted(DPM_CASES))
def test_dpm_matches_diffusers(case):
    check_config("dpmpp-2m", DPM_CASES[case])


def test_dpm_karras_cosine_duplicate_timesteps():
    # squaredcos + karras: timesteps are truncated, not rounded, and repeat (998, 998, ...). The step index
    # starts at the *second* match like diffusers, so a 10-step loop overruns the sigma table in both.
    cfg = dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    check_config("dpmpp-2m", cfg, steps=(1, 2))
    ours = DPMSolverMultistepScheduler(**cfg)
    ours.set_timesteps(10)
    assert list(ours.timesteps[:4]) == [998] * 4
    ours.step(np.zeros(SHAPE, np.float32), ours.timesteps[0], np.zeros(SHAPE, np.float32))
    assert ours.step_index == 2


def test_dpm_state_machine():
    s = DPMSolverMultistepScheduler(**SD)
    s.set_timesteps(10)
    assert s.step_index is None and s.lower_order_nums == 0 and s.model_outputs == [None, None]
    x = np.zeros(SHAPE, np.float32)
    s.step(fake_model(x, s.timesteps[0]), s.timesteps[0], x)
    assert s.step_index == 1 and s.lower_order_nums == 1 and s.model_outputs[0] is None
    s.set_timesteps(10)
    assert s.step_index is None and s.lower_order_nums == 0 and s.model_outputs == [None, None]


# ----------------------------------------------------------------------------------------------- Euler

EULER_CASES = {
    "dit": dict(DIT),
    "sd": dict(SD),
    "sd-leading": dict(SD, timestep_spacing="leading"),
    "sd-trailing": dict(SD, timestep_spacing="trailing"),
    "vpred-leading": dict(SD, prediction_type="v_prediction", timestep_spacing="leading"),
    "karras": dict(SD, use_karras_sigmas=True),
    "karras-bounds": dict(SD, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),
    "exponential": dict(SD, use_exponential_sigmas=True),
    "log-linear": dict(SD, interpolation_type="log_linear"),
    "continuous-vpred": dict(SD, prediction_type="v_prediction", timestep_type="continuous"),
    "sigma-min": dict(DIT, final_sigmas_type="sigma_min"),
    "sample-pred": dict(DIT, prediction_type="sample"),
}


@pytest.mark.parametrize("case", sorted(EULER_CASES))
def test_euler_matches_diffusers(case):
    check_config("euler", EULER_CASES[case])


def test_euler_zero_snr_vpred():
    # Zero-SNR Euler starts at sigma = 4096: x_T ~ 1e4 and the first step cancels it down to O(1), so a
    # 1-ulp difference anywhere (torch's CPU sqrt is not correctly rounded; numpy's is) becomes ~1e-3.
    # That is 1e-7 relative to the input scale, i.e. float32 noise: allow it, and nothing more.
    cfg = dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    check_config("euler", cfg, extra_atol=2e-3)


def test_euler_scale_and_integer_timestep():
    s = EulerDiscreteScheduler(**SD)
    s.set_timesteps(10)
    x = np.ones(SHAPE, np.float32)
    sigma = float(s.sigmas[0])
    np.testing.assert_allclose(s.scale_model_input(x, s.timesteps[0]), x / math.sqrt(sigma**2 + 1), rtol=1e-6)
    assert s.step_index == 0
    with pytest.raises(ValueError):
        s.step(x, 999, x)


# ----------------------------------------------------------------------------------------------- DDPM

DDPM_CASES = {
    "dit-fixed-small": dict(DIT, clip_sample=False),
    "dit-fixed-small-clip": dict(DIT, clip_sample=True),
    "fixed-large": dict(DIT, variance_type="fixed_large", clip_sample=False),
    "fixed-small-log": dict(SD, variance_type="fixed_small_log", clip_sample=False, timestep_spacing="trailing"),
    "vpred-linspace": dict(SD, prediction_type="v_prediction", clip_sample=False, timestep_spacing="linspace"),
    "sigmoid-sample": dict(beta_schedule="sigmoid", prediction_type="sample", clip_sample_range=2.0),
}


@pytest.mark.parametrize("case", sorted(DDPM_CASES))
def test_ddpm_matches_diffusers(case):
    check_config("ddpm", DDPM_CASES[case], ddpm_noise=True)


@pytest.mark.parametrize("vt", ["learned_range", "learned"])
def test_ddpm_learned_variance_split_channels(vt):
    # the model emits eps + variance channels (2x, as DiT does); diffusers splits them inside step()
    check_config("ddpm", dict(DIT, clip_sample=False, variance_type=vt), steps=(2, 10),
                 out_channels=2 * SHAPE[1], ddpm_noise=True)


def test_ddpm_model_var_equals_split_and_rng():
    cfg = dict(DIT, clip_sample=False, variance_type="learned_range")
    s = DDPMScheduler(**cfg)
    s.set_timesteps(10)
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    t = s.timesteps[3]
    full = fake_model(x, t, 2 * SHAPE[1])
    a = s.step(full, t, x, rng=np.random.default_rng(7))
    b = s.step(full[:, :4], t, x, rng=np.random.default_rng(7), model_var=full[:, 4:])
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="model_var"):
        s.step(full[:, :4], t, x, rng=np.random.default_rng(7))
    with pytest.raises(ValueError):
        s.step(full, t, x, noise=np.zeros(SHAPE, np.float32), rng=np.random.default_rng(7))


# ----------------------------------------------------------------------------------------------- add_noise

@pytest.mark.parametrize("name", DIFFUSERS_BACKED)
def test_add_noise_matches_diffusers(name):
    ours = SCHEDULERS[name](**SD)
    ref = getattr(diffusers, ours.class_name)(**SD)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    rng = np.random.default_rng(3)
    x0, noise = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
    t_ours, t_ref = ours.timesteps[[2, 7]], ref.timesteps[[2, 7]]
    assert_close(ours.add_noise(x0, noise, t_ours),
                 ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t_ref), "add_noise")


# ----------------------------------------------------------------------------------------------- config plumbing


@pytest.mark.parametrize("name", DIFFUSERS_BACKED)
def test_defaults_mirror_diffusers_signature(name):
    ours = SCHEDULERS[name]
    params = inspect.signature(getattr(diffusers, ours.class_name).__init__).parameters
    expected = {k: p.default for k, p in params.items() if k != "self"}
    assert set(ours.defaults) == set(expected)
    for k, v in expected.items():
        assert ours.defaults[k] == v, k
    s = ours()
    assert s.config == dict(ours.defaults) and s.num_train_timesteps == 1000


SD_DDIM_JSON = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.21.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None,
}


@pytest.mark.parametrize("name", DIFFUSERS_BACKED)
def test_make_scheduler_override_matches_from_config(name):
    """A PNDM-class SD config switched to each scheduler, as diffusers' from_config does."""
    ours = make_scheduler(SD_DDIM_JSON, name=name)
    ref = getattr(diffusers, ours.class_name).from_config(SD_DDIM_JSON)
    for k, v in ours.config.items():
        assert ref.config[k] == v, k
    run_loop(ours, ref, 10, ddpm_noise=(name == "ddpm"))


def test_make_scheduler_from_class_name_and_cross_fields():
    cfg = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.12.0", "variance_type": "fixed_small",
           "clip_sample": False, **DIT}
    s = make_scheduler(cfg)
    assert isinstance(s, DDPMScheduler) and s.config["clip_sample"] is False
    # DDPM -> DPM keeps the shared variance_type ("fixed_small" acts like None there) and drops clip_sample
    d = make_scheduler(cfg, name="dpmpp-2m")
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    assert d.config["variance_type"] == ref.config["variance_type"] == "fixed_small"
    assert "clip_sample" not in d.config
    run_loop(d, ref, 10)
    # keys listed in _use_default_values fall back to the target class's defaults, as in diffusers
    cfg2 = dict(SD_DDIM_JSON, _class_name="DDIMScheduler", _use_default_values=["timestep_spacing"])
    e = make_scheduler(cfg2, name="euler")
    assert e.config["timestep_spacing"] == "linspace"
    assert e.config["timestep_spacing"] == diffusers.EulerDiscreteScheduler.from_config(cfg2).config["timestep_spacing"]
    assert make_scheduler(dict(cfg2, unknown_future_field=3)).config == make_scheduler(cfg2).config


def test_name_mappings():
    assert scheduler_name_for_class("DDIMScheduler") == "ddim"
    assert scheduler_name_for_class("DPMSolverMultistepScheduler") == "dpmpp-2m"
    assert scheduler_name_for_class("EulerDiscreteScheduler") == "euler"
    assert scheduler_name_for_class("DDPMScheduler") == "ddpm"
    for name in SCHEDULERS:
        assert scheduler_name_for_class(class_name_for_scheduler(name)) == name
    assert set(CLASS_TO_NAME.values()) == set(SCHEDULERS)


def test_unknown_class_name_raises():
    with pytest.raises(SchedulerConfigError, match="HeunDiscreteScheduler"):
        make_scheduler({"_class_name": "HeunDiscreteScheduler"})
    with pytest.raises(SchedulerConfigError, match="FooScheduler"):
        scheduler_name_for_class("FooScheduler")
    with pytest.raises(SchedulerConfigError, match="_class_name"):
        make_scheduler({"beta_start": 0.001})
    with pytest.raises(SchedulerConfigError, match="heun"):
        make_scheduler(SD_DDIM_JSON, name="heun")
    assert issubclass(SchedulerConfigError, ValueError)


@pytest.mark.parametrize("name,field,value", [
    ("ddim", "beta_schedule", "cosine"),
    ("ddim", "prediction_type", "flow_prediction"),
    ("ddim", "timestep_spacing", "karras"),
    ("dpmpp-2m", "algorithm_type", "sde-dpmsolver++"),
    ("dpmpp-2m", "algorithm_type", "dpmsolver"),
    ("dpmpp-2m", "solver_order", 4),
    ("dpmpp-2m", "use_beta_sigmas", True),
    ("dpmpp-2m", "use_flow_sigmas", True),
    ("dpmpp-2m", "final_sigmas_type", "denoise_to_zero"),
    ("euler", "use_beta_sigmas", True),
    ("euler", "interpolation_type", "cubic"),
    ("ddpm", "variance_type", "fixed_large_log"),
    ("ddpm", "beta_schedule", "quadratic"),
])
def test_unsupported_value_raises_naming_field_and_value(name, field, value):
    cfg = {"_class_name": class_name_for_scheduler(name), field: value}
    with pytest.raises(SchedulerConfigError) as exc:
        make_scheduler(cfg)
    assert field in str(exc.value) and repr(value) in str(exc.value)
    assert exc.value.field == field and exc.value.value == value


def test_direct_constructor_rejects_unknown_field():
    with pytest.raises(TypeError):
        DDIMScheduler(solver_order=2)


# ----------------------------------------------------------------------------------------------- sanity


def test_comparison_is_sensitive_to_drift():
    """Negative control: a nearby-but-wrong config must fail the same checks."""
    ours = DPMSolverMultistepScheduler(**dict(SD, solver_type="heun"))
    ref = diffusers.DPMSolverMultistepScheduler(**SD)
    with pytest.raises(AssertionError):
        run_loop(ours, ref, 10)
    ours = DDIMScheduler(**dict(DIT, clip_sample=False, beta_end=0.0201))
    ref = diffusers.DDIMScheduler(**dict(DIT, clip_sample=False))
    with pytest.raises(AssertionError):
        run_loop(ours, ref, 10)


def test_runtime_schedulers_do_not_import_torch_or_diffusers():
    pkg = Path(inspect.getfile(DDIMScheduler)).parent
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ("torch", "diffusers"), f"{path.name} imports {n}"
