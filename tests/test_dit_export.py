"""Loaders and ONNX stages vs independent PyTorch references (OriginalDiT, diffusers' DiTTransformer2DModel)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dit_reference import make_diffusers_dit
from dydit_reference import dydit_checkpoint, random_dydit
from keystep.export.bundle_writer import export_stage
from keystep.export.dit_export import dit_stages
from keystep.export.dit_loaders import load_dit
from keystep.export.dit_model import timestep_frequencies
from keystep.runtime.bundle import Bundle


def inputs(batch, seed=0, num_classes=10, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    y = torch.randint(0, num_classes + 1, (batch,), generator=g)  # includes the null class
    return x, t, y


def test_original_checkpoint_loader_matches_original_dit(original_dit, original_checkpoint):
    loaded = load_dit(original_checkpoint, num_heads=4)
    cfg = loaded.model.config
    assert (cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.input_size, cfg.num_classes, cfg.learn_sigma) == (
        4, 64, 2, 8, 10, True)
    x, t, y = inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t, y), original_dit(x, t, y), rtol=1e-5, atol=1e-5)


def test_heads_are_inferred_from_dydit_routers_or_given(original_checkpoint, tmp_path):
    # TINY_CFG has 4 heads of 16 dims: the original format cannot tell, so --num-heads must say it
    assert load_dit(original_checkpoint, num_heads=4).model.config.num_heads == 4
    # DyDiT checkpoints do tell: every router has num_heads - 1 outputs (hidden 64 alone would suggest 1 head)
    for heads in (4, 2):
        path = tmp_path / f"dydit{heads}.pt"
        torch.save(dydit_checkpoint(random_dydit(0, num_heads=heads)), path)
        assert load_dit(path).model.config.num_heads == heads


@pytest.mark.parametrize("norm_eps", [1e-6, 1e-5, 1e-2])
def test_diffusers_loader_matches_diffusers_model(original_dit, tmp_path, norm_eps):
    """norm_eps: 1e-6 is the original DiT's, 1e-5 diffusers' default (what converted hub checkpoints carry), 1e-2
    one large enough that a loader ignoring it cannot pass."""
    reference = make_diffusers_dit(original_dit, norm_eps=norm_eps).eval()
    reference.save_pretrained(tmp_path / "transformer")
    loaded = load_dit(tmp_path / "transformer")
    assert loaded.model.config.mlp_norm_eps == norm_eps
    x, t, y = inputs(4)
    with torch.no_grad():
        expected = reference(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(loaded.model(x, t, y), expected, rtol=1e-5, atol=1e-5)
        if norm_eps == 1e-2:  # negative control: the same weights with the original eps are another function
            other = make_diffusers_dit(original_dit, norm_eps=1e-6).eval()
            assert (other(x, timestep=t, class_labels=y).sample - expected).abs().max() > 1e-3


def test_both_loaders_give_the_same_model_for_the_same_weights(original_dit, original_checkpoint, tmp_path):
    """Same weights through both formats: identical parameters; outputs identical once the one documented
    convention difference (diffusers' timestep frequency shift of 1) is aligned."""
    make_diffusers_dit(original_dit).save_pretrained(tmp_path / "transformer")
    a = load_dit(original_checkpoint, num_heads=4).model
    b = load_dit(tmp_path / "transformer").model
    sa, sb = a.state_dict(), b.state_dict()
    for name in sa:
        if name != "t_freqs":
            torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=name)
    assert (a.config.time_freq_shift, b.config.time_freq_shift) == (0, 1)
    b.t_freqs.copy_(timestep_frequencies(256, 0))
    x, t, y = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, y), b(x, t, y), rtol=1e-6, atol=1e-6)


def run_onnx(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("split", [1, 2])
def test_encoder_then_decoder_equals_full_model(original_dit, original_checkpoint, tmp_path, split):
    model = load_dit(original_checkpoint, num_heads=4).model
    stages = {s.name: s for s in dit_stages(model, split)}
    enc = export_stage(stages["encoder"], tmp_path)[0]
    dec = export_stage(stages["decoder"], tmp_path)[0]
    for batch in (1, 3, 6):
        x, t, y = inputs(batch, seed=batch)
        hidden = run_onnx(enc, {"latent": x.numpy(), "timestep": t.numpy(), "class_label": y.numpy()})
        out = run_onnx(dec, {"hidden": hidden, "timestep": t.numpy(), "class_label": y.numpy()})
        with torch.no_grad():
            expected = original_dit(x, t, y).numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_bundle_stages_match_the_reference(tiny_bundle, original_dit):
    bundle = Bundle.load(tiny_bundle)
    assert bundle.manifest["split"] == round(4 * 18 / 28)
    x, t, y = inputs(5, seed=9)
    feeds = {"latent": x.numpy(), "timestep": t.numpy(), "class_label": y.numpy()}
    full = run_onnx(bundle.stage("full").path, feeds)
    hidden = run_onnx(bundle.stage("encoder").path, feeds)
    split = run_onnx(bundle.stage("decoder").path,
                     {"hidden": hidden, "timestep": feeds["timestep"], "class_label": feeds["class_label"]})
    with torch.no_grad():
        expected = original_dit(x, t, y).numpy()
    np.testing.assert_allclose(full, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(split, expected, rtol=1e-4, atol=1e-4)
    for name in ("encoder", "decoder", "full"):
        assert bundle.stage(name).flops_per_sample > 0
    # encoder + decoder FLOPs ~= full FLOPs (same blocks, the embeddings are recomputed in both halves)
    enc_dec = bundle.stage("encoder").flops_per_sample + bundle.stage("decoder").flops_per_sample
    assert 1.0 <= enc_dec / bundle.stage("full").flops_per_sample < 1.1
