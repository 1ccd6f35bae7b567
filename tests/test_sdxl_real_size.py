"""Real-size SDXL export smoke (slow; run alone, it needs ~20 GB): stabilityai/stable-diffusion-xl-base-1.0's UNet
config (2.57 B parameters, 10.3 GB fp32) with random weights, exported as keystep's encoder and decoder stages with
external data, then run by ONNX Runtime against the PyTorch model. Prints peak memory, export times, file sizes and
the stages' FLOPs at 1024 px (the numbers docs/bundle.md and docs/benchmarks.md quote)."""

import gc
import json
import resource
import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

SDXL_BASE_UNET = dict(  # unet/config.json of stabilityai/stable-diffusion-xl-base-1.0
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), in_channels=4,
    layers_per_block=2, mid_block_type="UNetMidBlock2DCrossAttn", norm_num_groups=32, out_channels=4,
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=(1, 2, 10),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def test_real_size_sdxl_unet_exports_with_external_data(tmp_path):
    import onnxruntime as ort
    from diffusers import UNet2DConditionModel

    from keystep.export.bundle_writer import export_stage, stage_manifest_entry
    from keystep.export.unet_export import LoadedSD, unet_stages

    report = {}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_BASE_UNET).eval()
    parameters = sum(p.numel() for p in unet.parameters())
    assert 2.5e9 < parameters < 2.6e9
    report.update(parameters=parameters, init_seconds=time.perf_counter() - t0, rss_after_init_gib=peak_rss_gib())

    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500.0])
    e = torch.randn(1, 77, 2048, generator=g)
    added = {"text_embeds": torch.randn(1, 1280, generator=g), "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024,
                                                                                            1024]])}
    with torch.no_grad():
        expected = unet(x, t, e, added_cond_kwargs=added).sample.numpy()

    stages = [s for s in unet_stages(LoadedSD(unet), full=False) if s.name in ("encoder", "decoder")]
    # the bundle writer's own export (external data above the protobuf limit) and FLOP count, stage by stage; no
    # manifest: a bundle of the UNet alone (no text encoders, tokenizers) is not one the schema accepts
    out = tmp_path / "sdxl-real"
    out.mkdir()
    entries = {}
    report["export_seconds"] = {}
    for stage in stages:
        t0 = time.perf_counter()
        entries[stage.name] = stage_manifest_entry(stage, export_stage(stage, out), out)
        report["export_seconds"][stage.name] = round(time.perf_counter() - t0, 1)
    report["rss_after_export_gib"] = peak_rss_gib()
    del stages, unet
    gc.collect()

    report["files"] = {f["path"]: f["bytes"] for e in entries.values() for f in e["files"]}
    assert all(any(p.endswith(".onnx.data") for p in report["files"] if p.startswith(n)) for n in ("encoder", "decoder"))
    report["gflops_per_sample_1024px"] = {n: e["flops"]["per_sample"] / 1e9 for n, e in entries.items()}

    options = ort.SessionOptions()
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": e.numpy(),
             **{k: v.numpy() for k, v in added.items()}}
    encoder = ort.InferenceSession(str(out / "encoder.onnx"), options, providers=["CPUExecutionProvider"])
    skips = dict(zip([o.name for o in encoder.get_outputs()], encoder.run(None, feeds)))
    del encoder
    decoder = ort.InferenceSession(str(out / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    got = decoder.run(None, {**skips, **{k: feeds[k] for k in ("timestep", "encoder_hidden_states", "text_embeds",
                                                              "time_ids")}})[0]
    report["max_abs_error_vs_torch"] = float(np.abs(got - expected).max())
    report["peak_rss_gib"] = peak_rss_gib()
    print("SDXL real-size export:", json.dumps(report, indent=1))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
