"""Feature-caching plans: DeepCache (UNet) against the ``deepcache`` package itself, DiT block caching against a
plain PyTorch loop written here, the combined key-step + caching plan, and the plan grammar's errors."""

import DeepCache  # the reference for DeepCache plans (dev extra: deepcache==0.1.1)
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.dit_sampler import DiTSampler
from keystep.runtime.plan import PlanError, parse_cache, quad_center_steps
from keystep.runtime.sampler import SamplingOptions
from keystep.runtime.unet_sampler import UNetSampler
from dit_reference import DiTDDIM
from sd_reference import fd_decode, fd_encode


PROMPT, NEGATIVE = "a handwritten 7", "blurry"
BRANCHES = (0, 1, 3, 4)  # the tiny UNet's two blocks x two up layers (id = 3 * block + layer)


@pytest.fixture(scope="module")
def deep_pipe(sd_dir):
    return StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def deep_sampler(sd_bundle_dir):
    return UNetSampler(Bundle.load(sd_bundle_dir), get_backend("onnxruntime"))


def research_quad_center():
    """``sample_from_quad_center`` from DeepCache's research pipeline, read out of the package's source: the
    module itself no longer imports against current diffusers (it wants the removed ``PositionNet``)."""
    import ast
    from pathlib import Path

    source = (Path(DeepCache.__file__).parent / "sd" / "pipeline_stable_diffusion.py").read_text()
    tree = ast.parse(source)
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center")
    namespace = {"np": np}
    exec(compile(ast.Module([func], type_ignores=[]), "deepcache_research", "exec"), namespace)
    return namespace["sample_from_quad_center"]


class ScheduledDeepCacheHelper(DeepCache.DeepCacheSDHelper):
    """The package's helper with DeepCache's non-uniform mode: full steps from an explicit list (the helper only
    implements ``skip_mode='uniform'``; the research pipelines pick the list with ``sample_from_quad_center``)."""

    def __init__(self, pipe, full_steps):
        super().__init__(pipe=pipe)
        self.full_steps = set(full_steps)

    def is_skip_step(self, block_i, layer_i, blocktype="down"):
        if self.cur_timestep in self.full_steps:
            return False
        self.params["skip_mode"] = "non-uniform"
        return super().is_skip_step(block_i, layer_i, blocktype)


def deepcache_reference(pipe, helper, steps, guidance, latents):
    helper.enable()
    try:
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
                    latents=latents.clone(), output_type="latent").images.numpy()
    finally:
        helper.disable()


def keystep_run(sampler, spec, steps, guidance, latents, **kw):
    options = SamplingOptions.from_bundle(sampler.bundle, num_steps=steps, guidance=guidance, key_steps="all",
                                          cache=spec, **kw)
    return sampler.sample([PROMPT], options, negative_prompt=NEGATIVE, height=64, width=64, init_noise=latents.numpy())


@pytest.mark.parametrize("branch,interval", [(0, 3), (1, 2), (3, 4), (4, 3)])
def test_deepcache_uniform_equals_deepcache_helper(deep_pipe, deep_sampler, branch, interval):
    latents = torch.randn((1, 4, 8, 8), generator=torch.manual_seed(branch))
    helper = DeepCache.DeepCacheSDHelper(pipe=deep_pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch, skip_mode="uniform")
    expected = deepcache_reference(deep_pipe, helper, 10, 7.5, latents)
    ours = keystep_run(deep_sampler, f"deep{branch}:uniform:{interval}", 10, 7.5, latents)
    stages = [c.stage for c in ours.prepared.calls]
    assert stages == ["full" if i % interval == 0 else "cached" for i in range(10)]
    np.testing.assert_allclose(ours.latents, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("branch,interval,center", [(0, 3, 4), (4, 2, 3)])
def test_deepcache_non_uniform_equals_helper_on_the_research_schedule(deep_pipe, deep_sampler, branch, interval,
                                                                      center):
    sample_from_quad_center = research_quad_center()
    steps = 12
    full, _ = sample_from_quad_center(steps, -(-steps // interval), center=center, pow=1.4)
    latents = torch.randn((1, 4, 8, 8), generator=torch.manual_seed(7))
    helper = ScheduledDeepCacheHelper(deep_pipe, full)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    expected = deepcache_reference(deep_pipe, helper, steps, 7.5, latents)
    ours = keystep_run(deep_sampler, f"deep{branch}:quad:{interval}:{center}", steps, 7.5, latents)
    assert ours.prepared.cache.full_steps == tuple(sorted(full))
    np.testing.assert_allclose(ours.latents, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("total,count,center,power", [(50, 17, 15, 1.4), (50, 10, 15, 1.4), (25, 9, 8, 1.2),
                                                      (100, 20, 30, 1.4), (12, 6, 4, 1.4)])
def test_quad_schedule_equals_deepcache_research_code(total, count, center, power):
    expected, _ = research_quad_center()(total, count, center=center, pow=power)
    assert quad_center_steps(total, count, center, power) == [int(i) for i in expected]


def test_cached_steps_cost_fewer_flops(deep_sampler):
    bundle = deep_sampler.bundle
    full = bundle.stage("full").flops(2)
    shallow = {b: bundle.stage(f"cached.deep{b}").flops(2) for b in BRANCHES}
    assert all(0 < f < full for f in shallow.values())
    assert shallow[0] < shallow[1] < shallow[3] < shallow[4]  # deeper branch, more work


def combined_reference(pipe, latents, steps, guidance, key_steps, start, branch, interval):
    """FasterDiffusion (sd_reference's loop pieces) before ``start``, then the deepcache helper's wrapped UNet,
    enabled at ``start`` (its step counter starts at the first step it sees: full steps start, start + interval...)."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    try:
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
            text = torch.cat([uncond, cond])
            z = latents * scheduler.init_noise_sigma
            for i, t in enumerate(scheduler.timesteps):
                x = scheduler.scale_model_input(torch.cat([z, z]), t)
                rows_t = t.expand(len(x)).float()
                if i < start:
                    if i in key_steps:
                        cache = fd_encode(pipe.unet, x, rows_t, text)
                    noise = fd_decode(pipe.unet, *cache, rows_t, text)
                else:
                    if i == start:
                        helper.enable()
                    noise = pipe.unet(x, t, encoder_hidden_states=text).sample
                u, c = noise.chunk(2)
                z = scheduler.step(u + guidance * (c - u), t, z).prev_sample
    finally:
        helper.disable()
    return z.numpy()


def test_deepcache_branch_outside_the_unet_fails_the_build(sd_dir, tmp_path):
    from keystep.export.build import build_unet_bundle
    from keystep.export.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="DeepCache branch 2 is layer 2 of block 0, which has 2"):
        build_unet_bundle(str(sd_dir), str(tmp_path / "b"), cache="deep:2", progress=lambda m: None)
    with pytest.raises(ModelLoadError, match="DeepCache branch 6 is block 2, the UNet has 2"):
        build_unet_bundle(str(sd_dir), str(tmp_path / "b"), cache="deep:6", progress=lambda m: None)
    with pytest.raises(ModelLoadError, match="applies to DiT models"):
        build_unet_bundle(str(sd_dir), str(tmp_path / "b"), cache="blocks:1-2", progress=lambda m: None)
    assert not (tmp_path / "b").exists()


def test_combined_key_steps_then_deepcache_equals_reference(deep_pipe, deep_sampler):
    """Encoder propagation (key steps 0, 2) before step 4, DeepCache branch 1 every 3 steps from step 4 on."""
    latents = torch.randn((1, 4, 8, 8), generator=torch.manual_seed(1))
    options = SamplingOptions.from_bundle(deep_sampler.bundle, num_steps=10, guidance=7.5, key_steps="0,2",
                                          cache="deep1:uniform:3@4", parallel=False)
    assert options.noise_injection is None
    result = deep_sampler.sample([PROMPT], options, negative_prompt=NEGATIVE, height=64, width=64,
                                 init_noise=latents.numpy())
    assert not result.prepared.noise_injection  # off by default once caching is in the plan
    calls = [(c.stage, c.steps) for c in result.prepared.calls]
    assert calls[:6] == [("encoder", (0,)), ("decoder", (0,)), ("decoder", (1,)), ("encoder", (2,)),
                         ("decoder", (2,)), ("decoder", (3,))]
    assert [c for c, _ in calls[6:]] == ["full", "cached", "cached", "full", "cached", "cached"]
    expected = combined_reference(deep_pipe, latents, 10, 7.5, {0, 2}, 4, 1, 3)
    np.testing.assert_allclose(result.latents, expected, rtol=1e-4, atol=1e-4)


# --- DiT block caching ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def block_cache_sampler(block_cache_bundle):
    return DiTSampler(Bundle.load(block_cache_bundle), get_backend("onnxruntime"))


def block_cache_reference(dit, noise, labels, steps, guidance, first, last, full_steps, num_classes):
    """Plain PyTorch DiT loop (original DiT's module names) with Δ-DiT-style block caching, CFG rows
    [labels, null], DiT's own DDIM (the bundle's: conftest.clipped_dit_scheduler)."""
    scheduler = DiTDDIM(steps, "ddim", clip_denoised=True)
    y = torch.tensor(labels + [num_classes] * len(labels))
    z = torch.from_numpy(noise)
    residual = None
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            x_in = torch.cat([z, z])
            tt = torch.full((len(x_in),), float(t))
            c = dit.condition(tt, y)
            x = dit.embed(x_in)
            for k, block in enumerate(dit.blocks):
                if k == first:
                    before = x
                    if i not in full_steps:
                        x = x + residual
                if first <= k <= last and i not in full_steps:
                    continue
                x = block(x, c)
                if k == last and i in full_steps:
                    residual = x - before
            out = dit.unpatchify(dit.final_layer(x, c))
            eps = out[:, : z.shape[1]]
            cond, uncond = eps.chunk(2)
            z = scheduler.step(uncond + guidance * (cond - uncond), t, z).prev_sample
    return z.numpy()


@pytest.mark.parametrize("variant,first,last,schedule,full_steps", [
    ("blocks1-2", 1, 2, "uniform:3", {0, 3, 6, 9}),
    ("blocks2-2", 2, 2, "0,1,5", {0, 1, 5}),
])
def test_dit_block_caching_equals_pytorch_loop(block_cache_sampler, original_dit, variant, first, last, schedule,
                                               full_steps):
    num_classes = block_cache_sampler.num_classes
    noise = block_cache_sampler.initial_noise(2, seed=5)
    expected = block_cache_reference(original_dit, noise, [1, 3], 10, 4.0, first, last, full_steps, num_classes)
    options = SamplingOptions.from_bundle(block_cache_sampler.bundle, num_steps=10, guidance=4.0, key_steps="all",
                                          cache=f"{variant}:{schedule}")
    ours = block_cache_sampler.sample([1, 3], options, init_noise=noise)
    assert {c.steps[0] for c in ours.prepared.calls if c.stage == "full"} == full_steps
    np.testing.assert_allclose(ours.latents, expected, rtol=1e-4, atol=1e-4)


def test_dit_block_caching_saves_the_skipped_blocks_flops(block_cache_sampler):
    bundle = block_cache_sampler.bundle
    full, one, two = (bundle.stage(s).flops(2) for s in ("full", "cached.blocks2-2", "cached.blocks1-2"))
    depth = bundle.model_config["depth"]
    per_block = (full - one)
    assert 0 < per_block and abs((full - two) - 2 * per_block) <= 0.01 * full  # two blocks skipped = twice one
    assert per_block < full / depth * 1.01


# --- the plan grammar ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,message", [
    ("deep9:uniform:3", "not in this bundle"),
    ("deep0", "VARIANT:SCHEDULE"),
    ("deep0:uniform:0", "bad cache schedule"),
    ("deep0:every:3", "bad cache schedule"),
    ("deep0:1,2", "contain 0"),
    ("deep0:0,3,12", "in 0..9"),
    ("deep0:uniform:3@10", "out of range"),
    ("deep0:uniform:3@x", "@START"),
])
def test_bad_cache_specs_name_the_problem(spec, message):
    with pytest.raises(PlanError, match=message):
        parse_cache(spec, 10, ["deep0"])


def test_cache_spec_start_and_none():
    assert parse_cache("none", 10, ["deep0"]) is None
    plan = parse_cache("deep0:uniform:4@3", 10, ["deep0"])
    assert plan.start == 3 and plan.full_steps == (3, 7)


# --- the command line ---------------------------------------------------------------------------------------------


def test_cli_generate_inspect_profile_with_a_cache_plan(block_cache_bundle, tmp_path, capsys):
    from keystep.tools.cli import main

    out = tmp_path / "x.npy"
    assert main(["generate", str(block_cache_bundle), "--class", "2", "--steps", "10",
                 "--cache", "blocks1-2:uniform:3", "--save-latents", str(out)]) == 0
    assert np.load(out).shape == (1, 4, 8, 8)
    capsys.readouterr()
    assert main(["inspect", str(block_cache_bundle), "--steps", "10", "--cache", "blocks1-2:uniform:4@2"]) == 0
    shown = capsys.readouterr().out
    assert "cache   blocks1-2: blocks 1..2 skipped, cached residual added" in shown
    assert "cache blocks1-2: full steps [2, 6]" in shown and "cached.blocks1-2" in shown
    assert main(["profile", str(block_cache_bundle), "--steps", "10", "--repeats", "1", "--warmup", "0",
                 "--plan", "blocks2-2:uniform:2"]) == 0
    table = capsys.readouterr().out
    assert "blocks2-2:uniform:2" in table and "cached" in table
    assert main(["generate", str(block_cache_bundle), "--steps", "10", "--cache", "deep0:uniform:3"]) == 2
    assert "cache variant 'deep0' is not in this bundle; built: blocks1-2, blocks2-2" in capsys.readouterr().err
