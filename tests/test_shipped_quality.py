"""The shipped digits-dit, built as a user builds it, keeps its quality and its savings (a small default-run version
of the slow demo test). Numbers measured on 2000 samples are in docs/benchmarks.md (baseline 93.3 % class accuracy,
key-step uniform:6 94.6 % at 32.9 dB PSNR vs the baseline and 1.870 of 4.095 GFLOP/image); here 30 samples, three
per class, on the default plan the build wrote (50 steps, uniform:6, CFG 2). The classifier is the shipped one
(held-out accuracy 99.4 %), independent of the sampler. Time is not asserted (a shared 2-core machine); FLOPs, which
the speedup follows (docs/benchmarks.md: 2.08x measured for 2.19x fewer FLOPs), are."""

import numpy as np
import pytest

from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.dit_sampler import DiTSampler
from keystep.runtime.sampler import SamplingOptions
from keystep.tools.cli.quality import DigitMetrics, psnr


@pytest.fixture(scope="module")
def runs(digits_bundle):
    bundle = Bundle.load(digits_bundle)
    sampler = DiTSampler(bundle, get_backend("onnxruntime"))
    labels = np.repeat(np.arange(10), 3)
    default = SamplingOptions.from_bundle(bundle)
    return labels, {name: sampler.sample(list(labels), options, seed=0) for name, options in
                    (("baseline", default.with_plan("all")), ("key-step", default))}, sampler


def test_the_build_wrote_the_tuned_plan(runs):
    _, results, sampler = runs
    plan = sampler.bundle.default_plan
    assert (plan["num_steps"], plan["key_steps"], plan["guidance"]) == (50, "uniform:6", 2.0)
    assert results["key-step"].prepared.plan.key_steps == tuple(range(0, 50, 6))


def test_samples_show_the_requested_digit(runs):
    labels, results, _ = runs
    metrics = DigitMetrics()
    for name, result in results.items():
        assert metrics.accuracy(result.latents, labels) >= 0.8, name  # ~93 % over 2000 samples
        assert np.abs(result.latents).max() < 2.0  # in range: a trained model's samples


def test_key_steps_stay_close_to_the_baseline_and_save_flops(runs):
    labels, results, sampler = runs
    base, keys = results["baseline"], results["key-step"]
    assert psnr(keys.latents, base.latents) >= 28.0  # 32.9 dB over 2000 samples
    flops = {name: sampler.plan_flops(r.prepared) for name, r in results.items()}
    assert flops["key-step"] / flops["baseline"] < 0.5  # 1.870 / 4.095 GFLOP per image
    encoder_calls = sum(c.stage in ("encoder", "full") for c in keys.prepared.calls)
    assert encoder_calls == 9  # 9 key steps of 50: the encoder half runs 9 times, not 50

