"""DeepFloyd-IF with the full graphs and DeepCache (slow: a second cascade bundle): each stage's full-graph baseline
vs IFPipeline / IFSuperResolutionPipeline, and DeepCache on both stages vs the ``deepcache`` package's helper wrapped
around the diffusers pipelines (same noise through a torch-backed generator)."""

import DeepCache
import numpy as np
import pytest
import torch

from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.if_sampler import CascadeSampler
from keystep.runtime.sampler import SamplingOptions
from if_reference import TorchNormal

pytestmark = pytest.mark.slow
PROMPT = "a photo of a cat"
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def cascade(if_dirs, tmp_path_factory):
    from keystep.export.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "if-full"
    build_bundle(str(if_dirs[0]), str(out), super_resolution=[str(if_dirs[1])], steps=10, cache="deep:0,1",
                 progress=lambda m: None)
    return CascadeSampler(Bundle.load(out), get_backend("onnxruntime"))


@pytest.fixture(scope="module")
def low_res(if_pipes):
    return if_pipes[0](PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(5),
                       output_type="pt").images


def run_pipe(pipe, seed, steps, low_res=None, helper=None):
    if helper is not None:
        helper.enable()
    try:
        extra = {} if low_res is None else {"image": low_res}
        return pipe(prompt=PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                    output_type="pt", **extra).images.numpy()
    finally:
        if helper is not None:
            helper.disable()


def run_ours(stage, spec, seed, steps, size, low_res=None):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 3, size, size), generator=generator).numpy()
    options = SamplingOptions.from_bundle(stage.bundle, num_steps=steps).with_plan(spec)
    return stage.sample([PROMPT], options, init_noise=noise, generator=TorchNormal(generator),
                        image=None if low_res is None else low_res.numpy())


@pytest.mark.parametrize("index", [0, 1])
def test_full_graph_baseline_equals_the_pipeline(cascade, if_pipes, low_res, index):
    stage, size = cascade.stages[index], (16, 32)[index]
    image = None if index == 0 else low_res
    expected = run_pipe(if_pipes[index], 7, 6, image)
    ours = run_ours(stage, "all", 7, 6, size, image)
    assert {c.stage for c in ours.prepared.calls} == {"full"}
    np.testing.assert_allclose(ours.latents, expected, **TOL)


@pytest.mark.parametrize("index,branch,interval", [(0, 0, 3), (0, 1, 2), (1, 0, 2)])
def test_deepcache_equals_the_deepcache_helper(cascade, if_pipes, low_res, index, branch, interval):
    """DeepCacheSDHelper wraps IF's Resnet*/SimpleCrossAttn* blocks like SD's; keystep's shallow stage is the same
    computation."""
    stage, size, pipe = cascade.stages[index], (16, 32)[index], if_pipes[index]
    image = None if index == 0 else low_res
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch, skip_mode="uniform")
    expected = run_pipe(pipe, 8, 8, image, helper)
    ours = run_ours(stage, f"deep{branch}:uniform:{interval}", 8, 8, size, image)
    assert [c.stage for c in ours.prepared.calls] == ["full" if i % interval == 0 else "cached" for i in range(8)]
    np.testing.assert_allclose(ours.latents, expected, **TOL)
    plain = run_ours(stage, "all", 8, 8, size, image)
    assert np.abs(plain.latents - ours.latents).max() > 1e-4  # the cached steps differ from the full model
