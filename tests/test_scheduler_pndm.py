"""keystep.runtime.schedulers.PNDMScheduler (pure numpy) against diffusers' PNDMScheduler.

Whole sampling loops run through both implementations side by side, each fed its own previous output (so errors
compound), with a "model" that is a deterministic function of (x, t). Every step's output is compared, and the
timesteps (PNDM repeats some of them) must be equal."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from keystep.runtime.schedulers import (SCHEDULERS, PNDMScheduler, SchedulerConfigError,  # noqa: E402
                                        make_scheduler, scheduler_name_for_class)

ATOL, RTOL = 1e-5, 1e-4
STEPS = (1, 2, 10, 50)
PRK_STEPS = (4, 5, 10, 50)  # PRK warm-up needs >= 4 inference steps (diffusers fails below that too)
SHAPE = (2, 4, 8, 8)

DIT = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
          steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)

SD_JSON = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def fake_model(x: np.ndarray, t) -> np.ndarray:
    """Deterministic stand-in for a denoiser: depends on the sample and on t."""
    x = np.asarray(x, dtype=np.float64)
    return (0.1 * x + math.sin(float(t) / 100.0) + 0.05 * np.cos(x)).astype(np.float32)


def assert_close(a, b, what):
    b = b.numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if not np.allclose(a, b, atol=ATOL, rtol=RTOL):
        err = np.abs(a.astype(np.float64) - b)
        raise AssertionError(f"{what}: max abs err {err.max():.3e} (ref max {np.abs(b).max():.3e})")


def check_tables(ours, ref):
    assert_close(ours.alphas_cumprod, ref.alphas_cumprod, "alphas_cumprod")
    assert_close(np.asarray(ours.final_alpha_cumprod), ref.final_alpha_cumprod, "final_alpha_cumprod")
    ts_ref = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ts_ref.dtype == np.int64
    np.testing.assert_array_equal(ours.timesteps, ts_ref)
    np.testing.assert_array_equal(ours.prk_timesteps, ref.prk_timesteps)
    np.testing.assert_array_equal(ours.plms_timesteps, ref.plms_timesteps)
    assert isinstance(ours.init_noise_sigma, float) and ours.init_noise_sigma == ref.init_noise_sigma


def run_loop(ours, ref, n, *, seed=0):
    """Sample with both schedulers for n inference steps; compare every step's output."""
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    check_tables(ours, ref)
    x = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32) * np.float32(ours.init_noise_sigma)
    a, b = x.copy(), torch.from_numpy(x.copy())
    outs = []
    for i, t in enumerate(ours.timesteps):
        t_ref = ref.timesteps[i]
        a_in, b_in = ours.scale_model_input(a, t), ref.scale_model_input(b, t_ref)
        assert_close(a_in, b_in, f"scale_model_input step {i} (t={t})")
        m_a, m_b = fake_model(a_in, t), torch.from_numpy(fake_model(b_in.numpy(), t_ref))
        a = ours.step(m_a, t, a)
        b = ref.step(m_b, t_ref, b).prev_sample
        assert a.dtype == np.float32
        assert_close(a, b, f"step {i}/{len(ours.timesteps)} (t={t})")
        outs.append(a)
    assert ours.counter == ref.counter == len(ours.timesteps)
    return outs


def check_config(cfg, steps=STEPS):
    ours = PNDMScheduler(**cfg)
    ref = diffusers.PNDMScheduler(**cfg)
    assert_close(ours.alphas_cumprod, ref.alphas_cumprod, "alphas_cumprod (init)")
    # one scheduler object samples several times: set_timesteps must reset all multistep state
    for n in steps:
        run_loop(ours, ref, n)


# ----------------------------------------------------------------------------------------------- PLMS only

PLMS_CASES = {
    "sd": dict(SD),
    "dit": dict(DIT, skip_prk_steps=True),
    "sd-alpha-one": dict(SD, set_alpha_to_one=True),
    "sd-trailing": dict(SD, timestep_spacing="trailing"),
    "sd-linspace": dict(SD, timestep_spacing="linspace"),
    "sd-vpred": dict(SD, prediction_type="v_prediction"),
    "sd-vpred-trailing": dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"),
    "cosine": dict(beta_schedule="squaredcos_cap_v2", skip_prk_steps=True),
    "trained-betas": dict(trained_betas=list(np.linspace(1e-4, 0.03, 500)), num_train_timesteps=500,
                          skip_prk_steps=True),
}


@pytest.mark.parametrize("case", sorted(PLMS_CASES))
def test_plms_matches_diffusers(case):
    check_config(PLMS_CASES[case])


def test_sd_timesteps_repeat_second_entry():
    s = PNDMScheduler(**SD)
    s.set_timesteps(10)
    assert s.timesteps.tolist() == [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    s.set_timesteps(1)
    assert s.timesteps.tolist() == [1]
    s.set_timesteps(2)
    assert s.timesteps.tolist() == [501, 1, 1]


# ----------------------------------------------------------------------------------------------- PRK warm-up

PRK_CASES = {
    "dit": dict(DIT),  # diffusers' defaults: skip_prk_steps=False
    "sd": dict(SD, skip_prk_steps=False),
    "sd-alpha-one-trailing": dict(SD, skip_prk_steps=False, set_alpha_to_one=True, timestep_spacing="trailing"),
    "sd-vpred-linspace": dict(SD, skip_prk_steps=False, prediction_type="v_prediction",
                              timestep_spacing="linspace"),
}


@pytest.mark.parametrize("case", sorted(PRK_CASES))
def test_prk_matches_diffusers(case):
    check_config(PRK_CASES[case], steps=PRK_STEPS)


def test_prk_timesteps_and_too_few_steps():
    s = PNDMScheduler(**DIT)
    s.set_timesteps(10)
    assert s.timesteps.tolist() == [900, 850, 850, 800, 800, 750, 750, 700, 700, 650, 650, 600,
                                    600, 500, 400, 300, 200, 100, 0]
    for n in (1, 2, 3):
        with pytest.raises(ValueError):
            diffusers.PNDMScheduler(**DIT).set_timesteps(n)
        with pytest.raises(ValueError, match="skip_prk_steps"):
            s.set_timesteps(n)


# ----------------------------------------------------------------------------------------------- state / API


def test_set_timesteps_resets_state_mid_loop():
    """Abandon a loop half-way (PRK and PLMS state populated), then sample again: identical to a fresh object."""
    for cfg, n in ((SD, 10), (dict(DIT), 10)):
        used = PNDMScheduler(**cfg)
        used.set_timesteps(n)
        x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
        for t in used.timesteps[:7]:
            x = used.step(fake_model(x, t), t, x)
        assert used.counter == 7 and used.ets
        used.set_timesteps(n)
        assert used.counter == 0 and used.ets == [] and used.cur_sample is None and used.cur_model_output == 0
        fresh = PNDMScheduler(**cfg)
        fresh.set_timesteps(n)
        a = b = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
        for t in fresh.timesteps:
            a = used.step(fake_model(a, t), t, a)
            b = fresh.step(fake_model(b, t), t, b)
            np.testing.assert_array_equal(a, b)


def test_step_interface():
    s = PNDMScheduler(**SD)
    x = np.ones(SHAPE, np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 901, x)
    s.set_timesteps(10)
    assert s.scale_model_input(x, s.timesteps[0]) is x
    assert s.init_noise_sigma == 1.0 and s.num_train_timesteps == 1000 and len(s) == 1000
    t = s.timesteps[0]
    # deterministic: noise / rng are accepted and ignored
    out = s.step(fake_model(x, t), t, x, noise=np.zeros(SHAPE, np.float32))
    s.set_timesteps(10)
    out2 = s.step(fake_model(x, t), int(t), x, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out, out2)


def test_add_noise_matches_diffusers():
    ours, ref = PNDMScheduler(**SD), diffusers.PNDMScheduler(**SD)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    rng = np.random.default_rng(3)
    x0, noise = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
    t_ours, t_ref = ours.timesteps[[0, 2]], ref.timesteps[[0, 2]]
    assert_close(ours.add_noise(x0, noise, t_ours),
                 ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t_ref), "add_noise")


# ----------------------------------------------------------------------------------------------- config plumbing


def test_defaults_mirror_diffusers_signature():
    import inspect

    params = inspect.signature(diffusers.PNDMScheduler.__init__).parameters
    expected = {k: p.default for k, p in params.items() if k != "self"}
    assert PNDMScheduler.defaults == expected
    assert PNDMScheduler().config == expected


def test_registered_and_sd_json_roundtrip():
    assert SCHEDULERS["pndm"] is PNDMScheduler and PNDMScheduler.class_name == "PNDMScheduler"
    assert scheduler_name_for_class("PNDMScheduler") == "pndm"
    ours = make_scheduler(SD_JSON)  # class from _class_name; clip_sample (not a PNDM field) is ignored
    assert isinstance(ours, PNDMScheduler)
    ref = diffusers.PNDMScheduler.from_config(SD_JSON)
    assert ours.config == {k: ref.config[k] for k in PNDMScheduler.defaults}
    run_loop(ours, ref, 25)


def test_switch_from_ddim_config():
    """DDIM config -> PNDM, as diffusers' PNDMScheduler.from_config(ddim_config) does."""
    cfg = dict(SD_JSON, _class_name="DDIMScheduler", timestep_spacing="trailing")
    cfg.pop("skip_prk_steps")
    ours = make_scheduler(cfg, name="pndm")
    ref = diffusers.PNDMScheduler.from_config(cfg)
    assert ours.config["skip_prk_steps"] is False and ref.config.skip_prk_steps is False
    run_loop(ours, ref, 10)


@pytest.mark.parametrize("field,value", [
    ("prediction_type", "sample"),
    ("prediction_type", "flow_prediction"),
    ("timestep_spacing", "karras"),
    ("beta_schedule", "sigmoid"),
])
def test_unsupported_value_raises_naming_field_and_value(field, value):
    with pytest.raises(SchedulerConfigError) as exc:
        make_scheduler({"_class_name": "PNDMScheduler", field: value})
    assert field in str(exc.value) and repr(value) in str(exc.value)
    assert exc.value.field == field and exc.value.value == value


def test_rejects_fields_of_other_schedulers():
    with pytest.raises(TypeError):
        PNDMScheduler(clip_sample=False)


# ----------------------------------------------------------------------------------------------- sanity


def test_comparison_is_sensitive_to_drift():
    """Negative controls: nearby-but-wrong configs must fail the same checks."""
    with pytest.raises(AssertionError):  # PLMS vs PRK: different timesteps
        run_loop(PNDMScheduler(**dict(SD, skip_prk_steps=False)), diffusers.PNDMScheduler(**SD), 10)
    with pytest.raises(AssertionError):  # same timesteps, different final alpha
        run_loop(PNDMScheduler(**dict(SD, set_alpha_to_one=True)), diffusers.PNDMScheduler(**SD), 10)
    with pytest.raises(AssertionError):  # same timesteps, slightly different betas
        run_loop(PNDMScheduler(**dict(SD, beta_end=0.0121)), diffusers.PNDMScheduler(**SD), 10)
    with pytest.raises(AssertionError, match=r"^step 0/"):  # identical tables, different step() math
        run_loop(PNDMScheduler(**dict(SD, prediction_type="v_prediction")), diffusers.PNDMScheduler(**SD), 10)
