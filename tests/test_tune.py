"""``keystep tune``: the chosen plan meets the budget and is at least as faithful as every other plan tried —
both re-measured here with the plain sampler, not taken from tune's own report; the similarity heuristic's key
steps re-derived from a PyTorch run of the original DiT."""

import json
import shutil

import numpy as np
import pytest
import torch

from dit_reference import DiTDDIM
from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.dit_sampler import DiTSampler
from keystep.runtime.sampler import SamplingOptions
from keystep.tools.cli import main

CLASSES = [1, 3]


@pytest.fixture
def bundle_copy(block_cache_bundle, tmp_path):
    """tune rewrites the manifest: work on a copy of the shared bundle."""
    return shutil.copytree(block_cache_bundle, tmp_path / "bundle")


def run_plan(sampler, options, seeds):
    return np.concatenate([sampler.sample(CLASSES, options, seed=s).latents for s in range(seeds)])


def plan_flops(bundle, options):
    """FLOPs of a plan for the calibration batch, counted call by call from the manifest's per-stage numbers."""
    sampler = DiTSampler(bundle, get_backend("onnxruntime"))
    calls = sampler.prepare(options, len(CLASSES)).calls
    return sum(bundle.stage(c.runner).flops_per_sample * c.batch for c in calls)


def psnr(latents, reference):
    return 10 * np.log10(np.ptp(reference) ** 2 / np.mean((latents - reference) ** 2))


def test_tune_search_meets_budget_and_beats_every_other_plan(bundle_copy, capsys):
    code = main(["tune", str(bundle_copy), "--target-speedup", "1.6", "--steps", "10", "--seeds", "1",
                 "--class", *map(str, CLASSES), "--json"])
    assert code == 0
    out = capsys.readouterr().out
    record = json.loads(out[: out.rindex("}") + 1])
    bundle = Bundle.load(bundle_copy)
    assert bundle.manifest["tuned"]["chosen"] == record["chosen"]
    base = SamplingOptions.from_bundle(bundle, num_steps=10)
    chosen = base.with_plan(record["chosen"])
    assert (bundle.default_plan["key_steps"], bundle.default_plan.get("cache")) == (chosen.key_steps, chosen.cache)
    baseline_flops = plan_flops(bundle, base.with_plan("all"))
    assert plan_flops(bundle, chosen) <= baseline_flops / 1.6
    tried = [t["plan"] for t in record["trials"] if t["psnr"] is not None]
    assert any(p.startswith("blocks") for p in tried) and any(p.startswith("uniform") for p in tried)
    sampler = DiTSampler(bundle, get_backend("onnxruntime"))
    reference = run_plan(sampler, base.with_plan("all"), 1)
    fidelity = {p: psnr(run_plan(sampler, base.with_plan(p), 1), reference) for p in tried}
    assert all(plan_flops(bundle, base.with_plan(p)) <= baseline_flops / 1.6 for p in tried)
    assert fidelity[record["chosen"]] >= max(fidelity.values()) - 1e-6
    # the untried plans really were over the budget
    for t in record["trials"]:
        if t["psnr"] is None:
            assert plan_flops(bundle, base.with_plan(t["plan"])) > baseline_flops / 1.6
    # inspect says how the plan was chosen
    capsys.readouterr()
    assert main(["inspect", str(bundle_copy), "--no-verify"]) == 0
    shown = capsys.readouterr().out
    assert f"tuned   {record['chosen']} by keystep tune --method search" in shown


def test_tune_similarity_picks_the_steps_whose_encoder_features_change_most(bundle_copy, original_dit, capsys):
    budget = 0.75
    code = main(["tune", str(bundle_copy), "--target-speedup", str(1 / budget), "--method", "similarity",
                 "--steps", "10", "--seeds", "1", "--class", *map(str, CLASSES), "--dry-run", "--json"])
    assert code == 0
    out = capsys.readouterr().out
    record = json.loads(out[: out.rindex("}") + 1])
    keys = [int(s) for s in record["chosen"].split(",")]
    bundle = Bundle.load(bundle_copy)
    assert "tuned" not in bundle.manifest  # --dry-run
    # independent: the baseline trajectory in PyTorch, the encoder (blocks[:split]) features at every step
    split = bundle.manifest["split"]
    scheduler = DiTDDIM(10, "ddim", clip_denoised=True)  # the bundle's sampler (conftest.clipped_dit_scheduler)
    sampler = DiTSampler(bundle, get_backend("onnxruntime"))
    z = torch.from_numpy(sampler.initial_noise(len(CLASSES), 0))
    y = torch.tensor(CLASSES + [sampler.num_classes] * len(CLASSES))
    features = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = torch.cat([z, z])
            c = original_dit.condition(torch.full((len(x_in),), float(t)), y)
            h = original_dit.embed(x_in)
            for block in original_dit.blocks[:split]:
                h = block(h, c)
            features.append(h.flatten())
            for block in original_dit.blocks[split:]:
                h = block(h, c)
            eps = original_dit.unpatchify(original_dit.final_layer(h, c))[:, : z.shape[1]]
            cond, uncond = eps.chunk(2)
            z = scheduler.step(uncond + 4.0 * (cond - uncond), t, z).prev_sample
    f = torch.stack(features)
    change = ((f[1:] - f[:-1]).norm(dim=1) / f[:-1].norm(dim=1)).numpy()
    order = list(np.argsort(-change) + 1)
    k = len(keys) - 1
    assert keys == sorted([0] + order[:k])
    # as many key steps as the budget allows: one more would exceed it
    options = SamplingOptions.from_bundle(bundle, num_steps=10)
    more = sorted(keys + [order[k]])
    assert plan_flops(bundle, options.with_plan(",".join(map(str, keys)))) <= budget * plan_flops(
        bundle, options.with_plan("all")) < plan_flops(bundle, options.with_plan(",".join(map(str, more))))


def test_tune_errors(bundle_copy, capsys):
    assert main(["tune", str(bundle_copy), "--steps", "10"]) == 2
    assert "exactly one of --target-speedup and --budget-flops" in capsys.readouterr().err
    assert main(["tune", str(bundle_copy), "--steps", "10", "--target-speedup", "1000", "--seeds", "1"]) == 2
    assert "no plan tried meets the budget" in capsys.readouterr().err
