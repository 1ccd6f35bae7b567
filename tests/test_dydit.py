"""DyDiT width profiles (issue 4) vs the independent reference in tests/dydit_reference.py (no keystep inside).

Bundles (session fixtures in conftest.py): ``dydit_bundle`` (random DyDiT checkpoint, 5 steps, --max-profiles 2:
per stage one exact narrowed engine and one merged masked engine, gathered token selection), ``calibrated_bundle``
(the plain ``original_checkpoint``, --width calibrated:0.5) and, for the dense FLOP baseline, ``tiny_bundle``.
"""

import re
import warnings

import numpy as np
import pytest
import torch

from dit_reference import DiTDDIM
from dydit_reference import dydit_flops, dydit_sample
from keystep.export.build import build_dit_bundle
from keystep.export.dit_loaders import load_dit
from keystep.export.dit_model import narrow_block
from keystep.export.errors import ModelLoadError
from keystep.graphs.flops import count_flops
from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.dit_sampler import DiTSampler
from keystep.runtime.plan import PlanError
from keystep.runtime.sampler import SamplingOptions

ROUTER_PARTS = ("attn_rate", "mlp_rate", "token_selection")


# --------------------------------------------------------------------------------------------------------------------
# helpers (all "expected" values come from the reference model / formula)
# --------------------------------------------------------------------------------------------------------------------
def ddim(steps):
    """The bundles' sampler (conftest.clipped_dit_scheduler): DiT's DDIM, "ddimN" respacing, clip_denoised=True."""
    return DiTDDIM(steps, "ddim", clip_denoised=True)


def reference_masks(model, timesteps) -> np.ndarray:
    """Router masks as bool (n, depth, 2, heads): [..., 0, :] heads, [..., 1, :] MLP groups."""
    with torch.no_grad():
        attn, mlp = model.router_masks(torch.as_tensor(np.asarray(timesteps), dtype=torch.float32))
    return torch.stack([attn, mlp], dim=2).bool().numpy()


def as_masks(masks: np.ndarray):
    """bool (n, depth, 2, heads) -> the reference's (attn, mlp) float masks."""
    m = torch.from_numpy(np.asarray(masks)).float()
    return m[:, :, 0], m[:, :, 1]


def close(got, expected, tol=2e-5):
    got, expected = np.asarray(got), np.asarray(expected)
    return got.shape == expected.shape and np.abs(got - expected).max() <= tol * max(1.0, np.abs(expected).max())


class TokenCounts:
    """Records (block index, tokens its router sent through the MLP) for every reference block call, in order."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        self.hooks = [
            b.token_selection.register_forward_hook(lambda m, args, out, i=i: self.calls.append((i, int(out.sum()))))
            for i, b in enumerate(self.model.blocks)
        ]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    def per_block(self) -> dict[int, int]:
        out = {}
        for i, n in self.calls:
            out[i] = out.get(i, 0) + n
        return out


def stage_blocks(stage, split, depth):
    return list(range(0, split)) if stage == "encoder" else list(range(split, depth))


def engine_units(entry, heads) -> np.ndarray:
    """bool (stage blocks, 2, heads) from a manifest engine entry's kept head / group lists."""
    units = np.zeros((len(entry["heads"]), 2, heads), dtype=bool)
    for k, (h, g) in enumerate(zip(entry["heads"], entry["groups"])):
        units[k, 0, h], units[k, 1, g] = True, True
    return units


def serves(entry, units, stage_mask) -> bool:
    return not (stage_mask & ~units).any() if entry["masked"] else np.array_equal(stage_mask, units)


def stage_flops(cfg, blocks, units, token_fraction=1.0):
    """dydit_flops with the stage's blocks set to ``units`` (bool (len(blocks), 2, heads)) and the others off."""
    attn = np.zeros((cfg["depth"], cfg["num_heads"]))
    mlp = np.zeros_like(attn)
    for k, b in enumerate(blocks):
        attn[b], mlp[b] = units[k, 0], units[k, 1]
    return dydit_flops(cfg, attn, mlp, token_fraction)


def graph_flops(spec, strict=True):
    shapes = {s.name: s.concrete(1) for s in spec.inputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gather graphs: one warning per MLP node the counter cannot size
        return count_flops(spec.path, shapes, strict=strict)


def num_tokens(cfg):
    return (cfg["input_size"] // cfg["patch_size"]) ** 2


@pytest.fixture(scope="module")
def ort():
    return get_backend("onnxruntime")


@pytest.fixture(scope="module")
def dydit(dydit_bundle):
    return Bundle.load(dydit_bundle)


@pytest.fixture(scope="module")
def calibrated(calibrated_bundle):
    return Bundle.load(calibrated_bundle)


@pytest.fixture(scope="module")
def loaded(dydit_checkpoint_path):
    return load_dit(dydit_checkpoint_path)


# --------------------------------------------------------------------------------------------------------------------
# 1. loader
# --------------------------------------------------------------------------------------------------------------------
def test_loader_reads_ema_weights_routers_and_heads(loaded, dydit_model, dydit_checkpoint_path, tmp_path):
    ref = dydit_model
    assert loaded.source_kind == "dydit-checkpoint"
    assert loaded.model.config.num_heads == ref.num_heads == 4  # from the routers (64-dim heads would give 1)
    t = np.arange(1000)
    masks = loaded.routers.masks(loaded.model, t)
    expected = reference_masks(ref, t)
    assert masks.dtype == bool and masks.shape == (1000, ref.depth, 2, ref.num_heads)
    np.testing.assert_array_equal(masks, expected)
    assert len({m.tobytes() for m in expected}) > 1 and not expected.all()  # the routers do switch units off

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    tt, y = torch.tensor([0.0, 250.0, 600.0, 999.0]), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        dense = ref(x, tt, y, complete_model=True)
        torch.testing.assert_close(loaded.model(x, tt, y), dense, rtol=1e-5, atol=1e-5)  # token selection off
        # the "model" entry (training weights) is a different network with different masks: "ema" is the one loaded
        path = tmp_path / "model-only.pt"
        torch.save({"model": torch.load(dydit_checkpoint_path, weights_only=True)["model"]}, path)
        other = load_dit(path)
        assert (other.model(x, tt, y) - dense).abs().max() > 1e-2
        assert not np.array_equal(other.routers.masks(other.model, t), expected)


@pytest.mark.parametrize("keep", ["blocks.0.attn_rate.router.", "all but blocks.3.token_selection.mlp_head.2",
                                  "all but blocks.0.attn_rate.router.weight"])
def test_incomplete_dydit_checkpoint_names_the_missing_key(dydit_model, tmp_path, keep):
    sd = dydit_model.state_dict()
    if keep.startswith("all but "):
        sd = {k: v for k, v in sd.items() if not k.startswith(keep[len("all but "):])}
    else:
        sd = {k: v for k, v in sd.items() if not any(p in k for p in ROUTER_PARTS) or k.startswith(keep)}
    path = tmp_path / "incomplete.pt"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError) as err:
        load_dit(path)
    named = re.findall(r"blocks\.\d+\.[\w.]+\.weight", str(err.value))
    assert named and all(k not in sd for k in named), str(err.value)
    if keep.startswith("all but "):
        assert named == [keep[len("all but "):].removesuffix(".weight") + ".weight"]


def test_width_only_checkpoint_loads_without_its_constant_token_routers(dydit_model, tmp_path):
    """Token routers whose last layer is 0 with a positive bias keep every token whatever the input (a width-only
    DyDiT in the official layout): the loader leaves them out, and the model still equals the reference."""
    import copy

    ref = copy.deepcopy(dydit_model)
    with torch.no_grad():
        for block in ref.blocks:
            block.token_selection.mlp_head[2].weight.zero_()
            block.token_selection.mlp_head[2].bias.fill_(35.0)
    torch.save(ref.state_dict(), tmp_path / "width-only.pt")
    loaded = load_dit(tmp_path / "width-only.pt")
    assert all(block.token_router is None for block in loaded.model.blocks)
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0.0, 250.0, 600.0, 999.0]), torch.tensor([0, 3, 9, 10])
    masks = torch.from_numpy(loaded.routers.masks(loaded.model, t.numpy())).float()  # (N, depth, 2, H)
    model = loaded.model
    with torch.no_grad():
        c = model.condition(t, y)
        hidden, counts = model.run_blocks(model.embed(x), c, 0, model.config.depth, masks[:, :, 0].flatten(1),
                                          masks[:, :, 1].flatten(1))
        assert counts is None
        torch.testing.assert_close(model.head(hidden, c), ref(x, t, y), rtol=1e-5, atol=1e-5)
    # one block whose router can skip tokens: every router is kept
    sd = ref.state_dict()
    sd["blocks.1.token_selection.mlp_head.2.weight"] = torch.ones_like(sd["blocks.1.token_selection.mlp_head.2.weight"])
    torch.save(sd, tmp_path / "one-routed.pt")
    assert all(block.token_router is not None for block in load_dit(tmp_path / "one-routed.pt").model.blocks)


# --------------------------------------------------------------------------------------------------------------------
# 2. every engine == the dense masked reference, at every step it serves
# --------------------------------------------------------------------------------------------------------------------
def test_bundle_layout(dydit, dydit_model):
    width = dydit.manifest["width"]
    assert dydit.manifest["source"]["kind"] == "dydit-checkpoint"
    assert (width["spec"], width["token_selection"], width["approximation"]) == ("dydit", "gather", False)
    names = [e["name"] for e in width["engines"]]
    assert set(dydit.stages) == set(names)  # no dense encoder/decoder/full stages
    for stage in ("encoder", "decoder"):
        kinds = sorted(e["masked"] for e in width["engines"] if e["stage"] == stage)
        assert kinds == [False, True], (stage, kinds)  # an exact narrowed engine and a merged one per stage
    # the stored table is the routers' masks at every training timestep
    masks = np.load(dydit.root / "width" / "masks.npy")
    np.testing.assert_array_equal(masks, reference_masks(dydit_model, np.arange(1000)))


def test_every_engine_equals_dense_masked_reference(dydit, dydit_model, ort):
    ref, split = dydit_model, dydit.manifest["split"]
    depth, heads, hidden = ref.depth, ref.num_heads, ref.hidden_size
    timesteps = ddim(dydit.default_plan["num_steps"]).timesteps.numpy()
    served = {}
    for engines in dydit.width.assign(timesteps).values():
        for step, engine in enumerate(engines):
            served.setdefault(engine.name, []).append(step)
    entries = {e["name"]: e for e in dydit.manifest["width"]["engines"]}
    assert set(served) == set(entries)  # no engine is dead weight
    g = torch.Generator().manual_seed(0)
    merged_with_zeros = 0
    for name, steps in sorted(served.items()):
        entry = entries[name]
        blocks = stage_blocks(entry["stage"], split, depth)
        units = engine_units(entry, heads)
        t = np.repeat(timesteps[steps], 2).astype(np.float32)  # two rows per served step, all in one call
        n = len(t)
        masks = reference_masks(ref, t)
        for row in masks:
            assert serves(entry, units, row[blocks]), (name, row[blocks])
        merged_with_zeros += entry["masked"] and bool((masks[:, blocks] != units).any())
        y = torch.randint(0, ref.num_classes + 1, (n,), generator=g)
        feeds = {"timestep": t, "class_label": y.numpy()}
        with torch.no_grad(), TokenCounts(ref) as counts:
            c = ref.condition(torch.from_numpy(t), y)
            if entry["stage"] == "encoder":
                latent = torch.randn(n, ref.in_channels, ref.input_size, ref.input_size, generator=g)
                feeds["latent"] = latent.numpy()
                expected = ref.run_blocks(ref.embed(latent), c, None, 0, split, True, masks=as_masks(masks))
                key = "hidden"
            else:
                hidden_in = torch.randn(n, num_tokens(ref.config), hidden, generator=g)
                feeds["hidden"] = hidden_in.numpy()
                expected = ref.head(ref.run_blocks(hidden_in, c, None, split, depth, True, masks=as_masks(masks)), c)
                key = "model_output"
        if entry["masked"]:
            # each block's kept units side by side, in the manifest's order: 1 = on at this row's step
            feeds["head_mask"] = np.stack([np.concatenate(
                [m[b, 0, entry["heads"][k]] for k, b in enumerate(blocks)]) for m in masks]).astype(np.float32)
            feeds["group_mask"] = np.stack([np.concatenate(
                [m[b, 1, entry["groups"][k]] for k, b in enumerate(blocks)]) for m in masks]).astype(np.float32)
            engine = next(e for e in dydit.width.engines if e.name == name)
            for r, m in enumerate(masks):
                hm, gm = engine.mask_rows(m[blocks])
                np.testing.assert_array_equal(hm, feeds["head_mask"][r])
                np.testing.assert_array_equal(gm, feeds["group_mask"][r])
        out = ort.load(dydit.stage(name)).run(feeds)
        assert close(out[key], expected.numpy()), (name, np.abs(out[key] - expected.numpy()).max())
        selected = counts.per_block()
        assert out["mlp_tokens"].tolist() == [selected[b] for b in blocks], name
        assert all(0 < selected[b] < n * num_tokens(ref.config) for b in blocks)  # tokens really skipped
    assert merged_with_zeros  # a merged engine ran a step whose mask switches some of its units off


# --------------------------------------------------------------------------------------------------------------------
# 3. token modes at block level (torch, fast)
# --------------------------------------------------------------------------------------------------------------------
def _subset(g, n, within=None):
    """A random non-empty sorted subset of range(n) (or of ``within``)."""
    pool = list(range(n)) if within is None else list(within)
    keep = torch.rand(len(pool), generator=g) < 0.6
    keep[torch.randint(len(pool), (1,), generator=g)] = True
    return [p for p, k in zip(pool, keep.tolist()) if k]


def _block_inputs(ref, g, rows):
    """Realistic (x, c) for every block: random latents / t / labels through the reference's embedding and blocks."""
    latent = torch.randn(rows, ref.in_channels, ref.input_size, ref.input_size, generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g).float()
    y = torch.randint(0, ref.num_classes + 1, (rows,), generator=g)
    with torch.no_grad():
        c, x = ref.condition(t, y), ref.embed(latent)
        out = []
        for i in range(ref.depth):
            out.append((x, c))
            x = ref.run_blocks(x, c, ref.t_embed(t), i, i + 1, True)
    return out


def _indicator(units, n, rows):
    m = torch.zeros(rows, n)
    m[:, units] = 1.0
    return m


@pytest.mark.parametrize("mode", ["dense", "gather"])
def test_narrowed_and_masked_blocks_equal_reference_block(loaded, dydit_model, mode):
    ref, H, rows = dydit_model, dydit_model.num_heads, 3
    T = num_tokens(ref.config)
    g = torch.Generator().manual_seed(1)
    skipped = 0
    for trial in range(4):
        inputs = _block_inputs(ref, g, rows)
        for i, (ours, theirs) in enumerate(zip(loaded.model.blocks, ref.blocks)):
            x, c = inputs[i]
            heads, groups = ([*range(H)], [*range(H)]) if trial == 0 else (_subset(g, H), _subset(g, H))
            # narrowed to (heads, groups), no mask inputs == the full reference block masked to them
            block = narrow_block(ours, heads, groups)
            block.token_mode = mode
            with torch.no_grad(), TokenCounts(ref) as counts:
                expected = theirs(x, c, _indicator(heads, H, rows), _indicator(groups, H, rows), token_select=True)
                got, count = block(x, c)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert int(count) == counts.calls[0][1]
            skipped += rows * T - int(count)
            # narrowed to a union, per-row masks inside it (a merged engine)
            union_h, union_g = _subset(g, H), _subset(g, H)
            row_h = torch.stack([_indicator(_subset(g, H, union_h), H, 1)[0] for _ in range(rows)])
            row_g = torch.stack([_indicator(_subset(g, H, union_g), H, 1)[0] for _ in range(rows)])
            row_g[0] = _indicator([union_g[0]], H, 1)[0]  # rows really differ
            block = narrow_block(ours, union_h, union_g)
            block.token_mode = mode
            with torch.no_grad(), TokenCounts(ref) as counts:
                expected = theirs(x, c, row_h, row_g, token_select=True)
                got, count = block(x, c, row_h[:, union_h], row_g[:, union_g])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert int(count) == counts.calls[0][1]
    assert skipped > 0


def test_token_selection_off_equals_reference_without_token_routers(loaded, dydit_model):
    ref, H = dydit_model, dydit_model.num_heads
    g = torch.Generator().manual_seed(2)
    inputs = _block_inputs(ref, g, 2)
    for i, (ours, theirs) in enumerate(zip(loaded.model.blocks, ref.blocks)):
        x, c = inputs[i]
        heads, groups = _subset(g, H), _subset(g, H)
        block = narrow_block(ours, heads, groups)
        block.token_mode = "off"
        with torch.no_grad():
            got, count = block(x, c)
            expected = theirs(x, c, _indicator(heads, H, 2), _indicator(groups, H, 2), token_select=False)
            selected = theirs(x, c, _indicator(heads, H, 2), _indicator(groups, H, 2), token_select=True)
        assert count is None
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert (got - selected).abs().max() > 1e-3  # dropping the token router is an approximation


# --------------------------------------------------------------------------------------------------------------------
# 4. full sampling
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dydit_sampler(dydit, ort):
    return DiTSampler(dydit, ort)


@pytest.mark.parametrize("key_steps", ["default", "all", [0, 3]])
def test_sampling_equals_dydit_sample(dydit_sampler, dydit_model, key_steps):
    bundle, labels = dydit_sampler.bundle, [1, 2, 7]
    options = SamplingOptions.from_bundle(bundle, key_steps=key_steps, noise_injection=False)
    result = dydit_sampler.sample(labels, options, seed=3)
    steps = options.num_steps
    scheduler = ddim(steps)
    np.testing.assert_array_equal(result.prepared.timesteps, scheduler.timesteps.numpy())
    keys = result.prepared.plan.key_steps
    assert list(keys) == (list(range(steps)) if key_steps == "all" else [0] if key_steps == "default" else key_steps)
    z_T = torch.from_numpy(dydit_sampler.initial_noise(len(labels), 3))
    split = bundle.manifest["split"]
    expected = dydit_sample(dydit_model, z_T, labels, scheduler, options.guidance, split, keys).numpy()
    assert close(result.latents, expected, 1e-4), np.abs(result.latents - expected).max()
    runners = {c.runner for c in result.prepared.calls}
    engines = {e["name"] for e in bundle.manifest["width"]["engines"]}
    assert runners <= engines
    if key_steps == "all":
        assert runners == engines  # every engine, exact and merged, took part
    # the widths and token routers matter: the dense network gives something else
    dense = dydit_sample(dydit_model, z_T, labels, scheduler, options.guidance, split, keys, token_select=False,
                         masks_fn=lambda t: as_masks(np.ones((len(t), dydit_model.depth, 2, dydit_model.num_heads))))
    assert np.abs(expected - dense.numpy()).max() > 1e-2


def test_sampling_with_noise_injection_equals_dydit_sample(dydit_sampler, dydit_model):
    bundle, labels = dydit_sampler.bundle, [5, 0]
    options = SamplingOptions.from_bundle(bundle)  # the default plan injects noise
    assert (options.noise_alpha, options.noise_tau) == (0.003, 0.3)
    result = dydit_sampler.sample(labels, options, seed=4)
    assert result.prepared.noise_injection
    z_T = torch.from_numpy(dydit_sampler.initial_noise(len(labels), 4))
    args = (dydit_model, z_T, labels, ddim(options.num_steps), options.guidance, bundle.manifest["split"],
            result.prepared.plan.key_steps)
    expected = dydit_sample(*args, noise_injection=(0.003, 0.3)).numpy()
    assert close(result.latents, expected, 1e-4), np.abs(result.latents - expected).max()
    assert np.abs(expected - dydit_sample(*args).numpy()).max() > 1e-4  # injection did something


# --------------------------------------------------------------------------------------------------------------------
# 5. FLOPs
# --------------------------------------------------------------------------------------------------------------------
def test_engine_graphs_remove_exactly_the_dydit_macs(dydit, calibrated, tiny_bundle, dydit_model):
    """Graph MatMul/Gemm/Conv FLOPs: dense encoder/decoder (tiny_bundle: same architecture and split) minus each
    engine's == 2 x the MACs dydit_flops says its masks remove. Gather graphs run the MLP on a data-dependent number
    of tokens, which the counter cannot size: there the graph check covers attention (+ the token router, which the
    dense graph lacks) and the MLP is checked through the manifest's per-token cost."""
    dense = Bundle.load(tiny_bundle)
    cfg, split = dydit_model.config, dydit.manifest["split"]
    for bundle in (dydit, calibrated):
        assert bundle.manifest["split"] == dense.manifest["split"] == split
        assert bundle.model_config == dense.model_config
    T, H = num_tokens(cfg), cfg["num_heads"]
    dense_mm = {stage: graph_flops(dense.stage(stage)).matmul_conv for stage in ("encoder", "decoder")}
    head = dydit_model.blocks[0].token_selection.mlp_head
    router = 2 * T * (head[0].in_features * head[0].out_features + head[2].in_features * head[2].out_features)
    checked = 0
    for bundle, routed in ((dydit, True), (calibrated, False)):
        for entry in bundle.manifest["width"]["engines"]:
            blocks = stage_blocks(entry["stage"], split, cfg["depth"])
            units = engine_units(entry, H)
            ours = stage_flops(cfg, blocks, units)
            full = stage_flops(cfg, blocks, np.ones_like(units))
            spec = bundle.stage(entry["name"])
            report = graph_flops(spec, strict=not routed)
            removed = dense_mm[entry["stage"]] - report.matmul_conv
            if routed:
                unsized = report.uncounted.get("Gemm", 0) + report.uncounted.get("MatMul", 0)
                assert unsized == 2 * len(blocks), report.uncounted  # fc1 + fc2 of each block's gathered tokens
                expected = 2 * (full["attn_total"] - ours["attn_total"]) + 2 * full["mlp_total"] - len(blocks) * router
                assert removed == pytest.approx(expected, abs=0.5), entry["name"]
                # one token's MLP in each block: DyDiT's MLP term at 1/T of the tokens
                assert list(spec.token_mlp_flops) == pytest.approx([2 * ours["mlp"][b] / T for b in blocks])
            else:
                assert not spec.token_mlp_flops
                assert removed == pytest.approx(2 * (full["macs"] - ours["macs"]), abs=0.5), entry["name"]
            assert removed > 0
            checked += 1
    assert checked == len(dydit.manifest["width"]["engines"]) + len(calibrated.manifest["width"]["engines"])


def test_call_flops_count_the_tokens_that_ran_their_mlp(dydit_sampler, dydit_model):
    bundle, labels, key_steps = dydit_sampler.bundle, [4, 9], [0, 3]
    options = SamplingOptions.from_bundle(bundle, key_steps=key_steps, noise_injection=False)
    result = dydit_sampler.sample(labels, options, seed=5)
    cfg, split, depth = dydit_model.config, bundle.manifest["split"], dydit_model.depth
    T = num_tokens(cfg)
    z_T = torch.from_numpy(dydit_sampler.initial_noise(len(labels), 5))
    with TokenCounts(dydit_model) as counts:
        expected = dydit_sample(dydit_model, z_T, labels, ddim(options.num_steps), options.guidance, split, key_steps)
    assert close(result.latents, expected.numpy(), 1e-4)
    # the reference runs blocks[:split] at key steps, then blocks[split:], step by step: per step, block -> tokens
    calls, ran = iter(counts.calls), {}
    for step in range(options.num_steps):
        for b in (range(depth) if step in key_steps else range(split, depth)):
            i, n = next(calls)
            assert i == b
            ran[step, b] = n
    entries = {e["name"]: e for e in bundle.manifest["width"]["engines"]}
    skipped_total = 0
    assert len(result.call_flops) == len(result.prepared.calls)
    for call, actual in zip(result.prepared.calls, result.call_flops):
        entry = entries[call.runner]
        blocks = stage_blocks(entry["stage"], split, depth)
        units = engine_units(entry, cfg["num_heads"])
        full = bundle.stage(call.runner).flops(call.batch)
        tokens = {b: sum(ran[s, b] for s in call.steps) for b in blocks}
        skipped = {b: call.batch * T - tokens[b] for b in blocks}
        per_token = stage_flops(cfg, blocks, units)["mlp"]
        assert full - actual == pytest.approx(sum(skipped[b] * 2 * per_token[b] / T for b in blocks), abs=0.5)
        # the same in DyDiT's terms: MLP FLOPs at all tokens minus at the measured token fraction, per row
        rho = [tokens[b] / (call.batch * T) if b in blocks else 1.0 for b in range(depth)]
        at_rho = stage_flops(cfg, blocks, units, rho)["mlp_total"]
        assert full - actual == pytest.approx(2 * call.batch * (stage_flops(cfg, blocks, units)["mlp_total"] - at_rho))
        skipped_total += sum(skipped.values())
    assert skipped_total > 0


# --------------------------------------------------------------------------------------------------------------------
# 6. calibrated (training-free) widths
# --------------------------------------------------------------------------------------------------------------------
def test_calibrated_masks_meet_the_flops_target(calibrated, dydit_model):
    width = calibrated.manifest["width"]
    assert (width["spec"], width["approximation"]) == ("calibrated:0.5", False)
    cfg, depth, H = dydit_model.config, dydit_model.depth, dydit_model.num_heads
    table = np.load(calibrated.root / "width" / "masks.npy")
    assert table.shape == (1000, depth, 2, H) and table.dtype == bool
    patterns = {m.tobytes(): m for m in table}.values()
    assert len(patterns) > 1  # the choice depends on the timestep bucket
    dense_macs = dydit_flops(cfg, np.ones((depth, H)), np.ones((depth, H)))["dense_macs"]
    one_unit = np.zeros((depth, H))
    one_unit[0, 0] = 1
    unit_share = max(dydit_flops(cfg, one_unit, 0 * one_unit)["macs"], dydit_flops(cfg, 0 * one_unit, one_unit)["macs"])
    unit_share /= dense_macs
    for m in patterns:
        assert m[:, 0].any(1).all() and m[:, 1].any(1).all()  # no block loses all heads or all groups
        ratio = dydit_flops(cfg, m[:, 0], m[:, 1])["ratio"]
        assert 0.5 - unit_share <= ratio <= 0.5 + 1e-12, ratio


def independent_calibration(dit, scheduler_config, target=0.5, images=8, steps=50, buckets=10, guidance=4.0, seed=0):
    """export/calibrate.py's procedure as its docstring states it, written again on the reference OriginalDiT:
    a seeded CFG run of diffusers' DDIM (the "ddim" class on the bundle's scheduler config); per timestep bucket, each
    head's / MLP group's mean contribution norm to the residual stream (gate x its slice of proj / fc2 applied to its
    output) over the mean norm of the stream entering the block; per bucket, each block's best head and group, then
    the best score per DyDiT MAC (dydit_flops' accounting) while the kept MACs stay within ``target`` x dense;
    every training timestep takes its bucket's choice (or the nearest visited bucket's)."""
    from diffusers import DDIMScheduler

    cfg = dict(input_size=dit.input_size, patch_size=dit.patch_size, hidden_size=dit.hidden_size,
               num_heads=dit.num_heads, depth=dit.depth)
    depth, H = dit.depth, dit.num_heads
    one = np.zeros((depth, H))
    one[0, 0] = 1
    unit_macs = (dydit_flops(cfg, one, 0 * one)["macs"], dydit_flops(cfg, 0 * one, one)["macs"])
    cost = np.empty((depth, 2, H))
    cost[:, 0], cost[:, 1] = unit_macs
    sums, count = np.zeros((buckets, depth, 2, H)), np.zeros(buckets)
    bucket, entering = [0], {}

    def contribution(i, kind, unit_out, block):
        x, c = entering[i]
        gate = block.adaLN_modulation(c).chunk(6, dim=1)[2 if kind == 0 else 5]
        weight = (block.attn.proj if kind == 0 else block.mlp.fc2).weight  # (D, H * unit)
        per_unit = unit_out.reshape(*unit_out.shape[:2], H, -1)
        contrib = torch.einsum("ntuk,duk->ntud", per_unit, weight.reshape(weight.shape[0], H, -1))
        norm = (contrib * gate[:, None, None, :]).norm(dim=-1).mean(dim=(0, 1))
        sums[bucket[0], i, kind] += (norm / x.norm(dim=-1).mean()).numpy()

    handles = []
    for i, block in enumerate(dit.blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: entering.__setitem__(i, a)))
        for kind, layer in enumerate((block.attn.proj, block.mlp.fc2)):
            handles.append(layer.register_forward_pre_hook(
                lambda m, a, i=i, b=block, k=kind: contribution(i, k, a[0], b)))
    rng = np.random.default_rng(seed)
    z = torch.from_numpy(rng.standard_normal((images, dit.in_channels, dit.input_size, dit.input_size),
                                             dtype=np.float32))
    labels = torch.as_tensor(np.concatenate([rng.integers(0, dit.num_classes, images),
                                             np.full(images, dit.num_classes)]))
    scheduler = DDIMScheduler.from_config({k: v for k, v in scheduler_config.items() if k != "timestep_respacing"})
    scheduler.set_timesteps(steps)
    try:
        with torch.no_grad():
            for t in scheduler.timesteps:
                bucket[0] = min(int(t) * buckets // 1000, buckets - 1)
                count[bucket[0]] += 1
                out = dit(torch.cat([z, z]), torch.full((2 * images,), float(t)), labels)[:, : dit.in_channels]
                z = scheduler.step(out[images:] + guidance * (out[:images] - out[images:]), t, z).prev_sample
    finally:
        for h in handles:
            h.remove()
    chosen = {}
    for b in np.flatnonzero(count):
        score = sums[b] / count[b]
        keep = np.zeros(score.shape, dtype=bool)
        for i in range(depth):
            keep[i, 0, score[i, 0].argmax()] = keep[i, 1, score[i, 1].argmax()] = True
        budget = target * cost.sum() - cost[keep].sum()
        for flat in np.argsort(-(score / cost), axis=None):
            unit = np.unravel_index(flat, score.shape)
            if not keep[unit] and cost[unit] <= budget:
                keep[unit], budget = True, budget - cost[unit]
        chosen[b] = keep
    visited = np.array(sorted(chosen))
    return np.stack([chosen[visited[np.argmin(np.abs(visited - min(t * buckets // 1000, buckets - 1)))]]
                     for t in range(1000)])


@pytest.fixture(scope="module")
def calibrated_table(calibrated, original_dit):
    return independent_calibration(original_dit, calibrated.scheduler_config)


def test_calibrated_table_equals_an_independent_calibration(calibrated, calibrated_table):
    table = np.load(calibrated.root / "width" / "masks.npy")
    assert (table != calibrated_table).sum() == 0, np.argwhere(table != calibrated_table)[:5]


@pytest.mark.parametrize("key_steps", ["default", "all"])
def test_calibrated_sampling_equals_masked_reference(calibrated, calibrated_table, dydit_model, original_dit, ort,
                                                     key_steps):
    # random_dydit(0) is random_original_dit(0) + routers: the same DiT weights as the calibrated checkpoint
    sd = dydit_model.state_dict()
    for k, v in original_dit.state_dict().items():
        assert torch.equal(sd[k], v), k
    sampler = DiTSampler(calibrated, ort)
    labels = [3, 8]
    options = SamplingOptions.from_bundle(calibrated, key_steps=key_steps, noise_injection=False)
    result = sampler.sample(labels, options, seed=6)
    z_T = torch.from_numpy(sampler.initial_noise(len(labels), 6))
    args = (dydit_model, z_T, labels, ddim(options.num_steps), options.guidance, calibrated.manifest["split"],
            result.prepared.plan.key_steps)
    # the masks at each step's timestep, from the independent calibration (not the bundle's table)
    expected = dydit_sample(*args, token_select=False,
                            masks_fn=lambda t: as_masks(calibrated_table[t.numpy().astype(int)])).numpy()
    assert close(result.latents, expected, 1e-4), np.abs(result.latents - expected).max()
    dense = dydit_sample(*args, token_select=False,
                         masks_fn=lambda t: as_masks(np.ones((len(t), dydit_model.depth, 2, dydit_model.num_heads))))
    assert np.abs(expected - dense.numpy()).max() > 1e-2  # half the units are gone


# --------------------------------------------------------------------------------------------------------------------
# 7. errors
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,message", [("dydit", "router"), ("calibrated:2", "calibrated"),
                                          ("calibrated:0", "calibrated"), ("calibrated:half", "calibrated"),
                                          ("wide", "width")])
def test_bad_width_requests_fail_the_build(original_checkpoint, tmp_path, spec, message):
    out = tmp_path / "bundle"
    with pytest.raises(ModelLoadError, match=message):
        build_dit_bundle(str(original_checkpoint), str(out), num_heads=4, width=spec, progress=lambda m: None)
    assert not out.exists()


@pytest.mark.parametrize("which", ["dydit", "calibrated"])
def test_a_step_count_no_engine_covers_is_a_plan_error(which, dydit, calibrated, dydit_model, ort):
    bundle = dydit if which == "dydit" else calibrated
    table = np.load(bundle.root / "width" / "masks.npy")
    split, depth, H = bundle.manifest["split"], dydit_model.depth, dydit_model.num_heads
    entries = [(e, engine_units(e, H)) for e in bundle.manifest["width"]["engines"]]

    # DiT's "ddimN" respacing takes the counts an integer stride gives; 37, say, is a PlanError of its own
    counts = [n for n in range(2, 40) if any(len(range(0, 1000, stride)) == n for stride in range(1, 1000))]
    with pytest.raises(PlanError, match="cannot take exactly 37 of 1000 timesteps with an integer stride"):
        DiTSampler(bundle, ort).sample([1], SamplingOptions.from_bundle(bundle, num_steps=37))

    def covered(steps):
        for t in ddim(steps).timesteps.numpy():
            for stage in ("encoder", "decoder"):
                part = table[int(t)][stage_blocks(stage, split, depth)]
                if not any(serves(e, u, part) for e, u in entries if e["stage"] == stage):
                    return False
        return True

    built = bundle.default_plan["num_steps"]
    assert covered(built)
    uncovered = [n for n in counts if not covered(n)]
    assert uncovered, "every step count is covered: this bundle cannot show the error"
    sampler = DiTSampler(bundle, ort)
    with pytest.raises(PlanError, match="no (encoder|decoder) engine"):
        sampler.sample([1], SamplingOptions.from_bundle(bundle, num_steps=uncovered[0]))
    if which == "dydit":  # a step count the bundle was not built for, but covers, is exact too
        steps = next(n for n in counts if n != built and covered(n))
        options = SamplingOptions.from_bundle(bundle, num_steps=steps, noise_injection=False)
        result = sampler.sample([2, 6], options, seed=7)
        z_T = torch.from_numpy(sampler.initial_noise(2, 7))
        expected = dydit_sample(dydit_model, z_T, [2, 6], ddim(steps), options.guidance, split,
                                result.prepared.plan.key_steps).numpy()
        assert close(result.latents, expected, 1e-4)
