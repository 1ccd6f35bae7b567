"""SDXL and DeepFloyd-IF on reduced random-weight models: eager diffusers (alone and with the ``deepcache`` helper)
vs keystep's baseline, key-step and DeepCache plans on ONNX Runtime, each engine's rows in its own process.

    python -m keystep.tools.bench.families --model sdxl|if [--steps N] [--size PX] [--repeats 1] [--dir WORK]
                                           [--markdown FILE]

The parent process builds the diffusers directories and the bundle (kept in ``--dir`` for reruns) and the initial
noise, then starts one process for the eager rows and one for keystep's; each runs its rows interleaved, a warm-up
round first, and returns times and final latents. SDXL: a StableDiffusionXLPipeline with a reduced UNet (block
channels 160/320/640, SDXL's 2 layers per block, transformer depth 1/2/4 — SDXL's 1/2/10 —, cross-attention 2048 from
768 + 1280-wide 2-layer CLIP encoders, the real 2816-wide text_time embedding) and a small VAE; Euler, as the SDXL
release. IF: stage I (IF-I-XL's block layout at 1/4 of its channels, 32 px) + stage II (IF-II's layout reduced,
128 px) with a 2-layer T5 of width 1024; the pipelines' own defaults (100 + 50 DDPM steps, guidance 7 / 4,
noise level 250). FLOP bounds are the plans' graph-counted FLOPs vs the baseline's; PSNR is of the final samples
vs keystep's baseline (IF's eager pipelines draw their own noise, so their rows have none).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import cpu_name

PROMPT = "a photo of an astronaut riding a horse"
SDXL_UNET = dict(
    block_out_channels=(160, 320, 640), layers_per_block=2, transformer_layers_per_block=(1, 2, 4),
    attention_head_dim=(2, 5, 10), use_linear_projection=True, cross_attention_dim=2048, sample_size=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
IF_COMMON = dict(attention_head_dim=64, addition_embed_type="text", addition_embed_type_num_heads=16,
                 cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu",
                 encoder_hid_dim=1024, encoder_hid_dim_type="text_proj", mid_block_type="UNetMidBlock2DSimpleCrossAttn")
IF_STAGE_1 = dict(sample_size=32, in_channels=3, out_channels=6, layers_per_block=2, cross_attention_dim=512,
                  block_out_channels=(128, 256, 384, 512),
                  down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
                  up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",), **IF_COMMON)
IF_STAGE_2 = dict(sample_size=128, in_channels=6, out_channels=6, layers_per_block=1, cross_attention_dim=256,
                  block_out_channels=(32, 64, 128, 256),
                  down_block_types=("ResnetDownsampleBlock2D",) * 2 + ("SimpleCrossAttnDownBlock2D",) * 2,
                  up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",) * 2,
                  class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu", **IF_COMMON)
IF_SCHEDULER = dict(beta_schedule="squaredcos_cap_v2", thresholding=True, dynamic_thresholding_ratio=0.95,
                    sample_max_value=1.5, variance_type="learned_range")


# --- the reduced models -------------------------------------------------------------------------------------------


def _byte_vocab() -> dict[str, int]:
    from keystep.runtime.tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    return {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}


def make_sdxl_dir(path: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET)
    vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        scaling_factor=0.13025)
    common = dict(num_hidden_layers=2, vocab_size=1000, max_position_embeddings=77, bos_token_id=512, eos_token_id=513)
    first = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, **common))
    second = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                        num_attention_heads=20, projection_dim=1280, **common))
    vocab = _byte_vocab()
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=first.eval(), text_encoder_2=second.eval(),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="!"),
        unet=unet.eval(), scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(path)
    return path


def make_if_dirs(path: Path) -> tuple[Path, Path]:
    import string

    import torch
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=256, d_model=1024, d_kv=64, d_ff=2816, num_layers=2, num_heads=16,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False)).eval()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_lowercase] + [("\u2581" + w, -1.0) for w in PROMPT.split()]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=8)
    common = dict(text_encoder=t5, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                  watermarker=None, requires_safety_checker=False)
    stage_1 = IFPipeline(unet=UNet2DConditionModel(**IF_STAGE_1).eval(), scheduler=DDPMScheduler(**IF_SCHEDULER),
                         **common)
    stage_2 = IFSuperResolutionPipeline(unet=UNet2DConditionModel(**IF_STAGE_2).eval(),
                                        scheduler=DDPMScheduler(**IF_SCHEDULER),
                                        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
                                        **common)
    stage_1.save_pretrained(path / "stage_1")
    stage_2.save_pretrained(path / "stage_2")
    return path / "stage_1", path / "stage_2"


def prepare(args, work: Path) -> Path:
    """Model directories and the bundle (DeepCache branch ``--branch`` built in), reused when present."""
    from keystep.export.build import build_bundle

    bundle = work / f"{args.model}-bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    if args.model == "sdxl":
        model, extra = make_sdxl_dir(work / "sdxl"), {}
    else:
        model, second = make_if_dirs(work / "if")
        extra = {"super_resolution": [str(second)]}
    t0 = time.perf_counter()
    build_bundle(str(model), str(bundle), cache=f"deep:{args.branch}", progress=lambda m: print(m, file=sys.stderr),
                 **extra)
    (work / f"{args.model}-build.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    return bundle


# --- the worker processes -------------------------------------------------------------------------------------------


def interleaved(rows: dict, repeats: int) -> dict:
    """Every row once per round, the first round a warm-up: {name: (median seconds, [seconds], latents)}."""
    times = {name: [] for name in rows}
    latents = {}
    for i in range(repeats + 1):
        for name, run in rows.items():
            t0 = time.perf_counter()
            latents[name] = run()
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), t, latents[name]) for name, t in times.items()}


def eager_rows(args, work: Path) -> dict:
    import torch
    from DeepCache import DeepCacheSDHelper

    torch.set_num_threads(os.cpu_count() or 1)
    noise = np.load(work / f"{args.model}-noise.npy")
    if args.model == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipes = [StableDiffusionXLPipeline.from_pretrained(work / "sdxl")]
    else:
        from diffusers import IFPipeline, IFSuperResolutionPipeline

        pipes = [IFPipeline.from_pretrained(work / "if" / "stage_1"),
                 IFSuperResolutionPipeline.from_pretrained(work / "if" / "stage_2")]
    helpers = []
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=args.interval, cache_branch_id=args.branch)
        helpers.append(helper)

    def run(cached: bool):
        for helper in helpers if cached else []:
            helper.enable()
        try:
            with torch.inference_mode():
                if args.model == "sdxl":
                    return pipes[0](PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                                    guidance_scale=5.0, latents=torch.from_numpy(noise),
                                    output_type="latent").images.numpy()
                generator = torch.Generator().manual_seed(0)
                image = pipes[0](PROMPT, generator=generator, output_type="pt").images
                return pipes[1](image=image, prompt=PROMPT, generator=generator, output_type="pt").images.numpy()
        finally:
            for helper in helpers if cached else []:
                helper.disable()

    return {"diffusers eager": lambda: run(False),
            f"diffusers eager + deepcache (I={args.interval}, B={args.branch})": lambda: run(True)}


def keystep_plans(args) -> dict[str, str]:
    deep = f"deep{args.branch}:uniform:{args.interval}"
    return {"keystep baseline": "all", "key-step (default plan), decoders batched": "default",
            "key-step (default plan), one decoder call per step": "default", f"DeepCache {deep}": deep}


def keystep_rows(args, work: Path) -> tuple[dict, dict]:
    """The rows and each row's FLOPs (its plan over every diffusion stage)."""
    from dataclasses import replace

    from keystep.runtime.backends.base import get_backend
    from keystep.runtime.bundle import Bundle
    from keystep.runtime.sampler import SamplingOptions
    from keystep.runtime.samplers import sampler_for

    bundle = Bundle.load(work / f"{args.model}-bundle")
    sampler = sampler_for(bundle, get_backend("onnxruntime"))
    rows, flops = {}, {}
    def plan(stage_bundle, spec, **overrides):
        """"default": the bundle's own default plan (IF stage II's is the baseline), else the spec."""
        options = SamplingOptions.from_bundle(stage_bundle, **overrides)
        return options if spec == "default" else options.with_plan(spec)

    for name, spec in keystep_plans(args).items():
        parallel = "batched" in name
        if args.model == "sdxl":
            options = replace(plan(bundle, spec, num_steps=args.steps, guidance=5.0), parallel=parallel)
            noise = np.load(work / "sdxl-noise.npy")
            rows[name] = lambda o=options: sampler.sample([PROMPT], o, height=args.size, width=args.size,
                                                          init_noise=noise).latents
            flops[name] = sampler.plan_flops(sampler.prepare(options, 1)) * (args.size / 256) ** 2
        else:
            stages = [replace(plan(s.bundle, spec), parallel=parallel) for s in sampler.stages]
            rows[name] = lambda o=stages: sampler.sample([PROMPT], o, seed=0)[-1].latents
            flops[name] = sum(s.plan_flops(s.prepare(o, 1)) for s, o in zip(sampler.stages, stages))
    return rows, flops


def worker(args, work: Path) -> None:
    if args.worker == "eager":
        rows, flops = eager_rows(args, work), {}
    else:
        rows, flops = keystep_rows(args, work)
    measured = interleaved(rows, args.repeats)
    np.savez(work / f"{args.model}-{args.worker}-latents.npz", **{str(i): m[2] for i, m in enumerate(measured.values())})
    (work / f"{args.model}-{args.worker}.json").write_text(json.dumps(
        {"rows": [{"name": n, "median": m[0], "times": m[1], "flops": flops.get(n)} for n, m in measured.items()]}))


# --- the parent: prepare, run both workers, tabulate ---------------------------------------------------------------


def run_worker(args, kind: str) -> tuple[list[dict], list[np.ndarray]]:
    cmd = [sys.executable, "-m", "keystep.tools.bench.families", "--worker", kind, *args.argv]
    subprocess.run(cmd, check=True)
    work = Path(args.dir)
    rows = json.loads((work / f"{args.model}-{kind}.json").read_text())["rows"]
    stored = np.load(work / f"{args.model}-{kind}-latents.npz")
    return rows, [stored[str(i)] for i in range(len(rows))]


def table(args, eager, keystep) -> str:
    from ..cli.tune import latent_psnr

    rows = [(r, lat, "PyTorch") for r, lat in zip(*eager)] + [(r, lat, "onnxruntime") for r, lat in zip(*keystep)]
    base = next(i for i, (r, _, _) in enumerate(rows) if r["name"] == "keystep baseline")
    base_row, base_latents = rows[base][0], rows[base][1]
    eager_time = rows[0][0]["median"]
    what = (f"reduced SDXL (UNet 160/320/640, depth 1/2/4), {args.size}×{args.size} px, {args.steps} Euler steps, "
            f"CFG 5" if args.model == "sdxl" else
            "reduced DeepFloyd-IF cascade (stage I 32 px, 100 DDPM steps, CFG 7 → stage II 128 px, 50 steps, CFG 4)")
    lines = [f"`{args.command}` — {cpu_name()}, {os.cpu_count()} cores; {what}; batch 1; median of "
             f"{args.repeats} run(s) after a warm-up round; eager and keystep rows each in their own process", "",
             "| row | engine | s/image | vs diffusers | vs keystep baseline | GFLOP | FLOP bound vs baseline | "
             "PSNR vs baseline |", "|---|---|---|---|---|---|---|---|"]
    for i, (r, latents, engine) in enumerate(rows):
        flops = r["flops"] if r["flops"] is not None else (base_row["flops"] if r["name"] == "diffusers eager" else None)
        bound = "—" if flops is None else f"{base_row['flops'] / flops:.3f}×"
        same_noise = engine == "onnxruntime" or args.model == "sdxl"
        psnr = latent_psnr(latents, base_latents)[0] if same_noise and i != base else None
        quality = "—" if psnr is None else ("∞" if np.isinf(psnr) else f"{psnr:.1f} dB")
        lines.append(f"| {r['name']} | {engine} | {r['median']:.3f} | {eager_time / r['median']:.2f}× | "
                     f"{base_row['median'] / r['median']:.2f}× | {'—' if flops is None else f'{flops / 1e9:.0f}'} | "
                     f"{bound} | {quality} |")
    build = json.loads((Path(args.dir) / f"{args.model}-build.json").read_text())["seconds"]
    lines.append(f"\nBundle build: {build:.0f} s. FLOP bound = baseline FLOPs / the row's FLOPs (graph-counted"
                 + (", scaled by pixel count from the manifest's 256 px" if args.model == "sdxl" else "") + ").")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["sdxl", "if"], required=True)
    parser.add_argument("--steps", type=int, default=50, help="SDXL steps (IF: the pipelines' 100 + 50)")
    parser.add_argument("--size", type=int, default=256, help="SDXL image height = width in pixels")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--interval", type=int, default=3, help="DeepCache cache interval")
    parser.add_argument("--branch", type=int, default=0, help="DeepCache cache_branch_id")
    parser.add_argument("--dir", default="keystep-bench-families", help="work directory (models, bundle, results)")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build the models and the bundle into --dir and stop (run this under cpu-shared, the "
                        "timed run under cpu-exclusive)")
    parser.add_argument("--worker", choices=["eager", "keystep"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--prepare-only"]
    args.command = "python -m keystep.tools.bench.families " + " ".join(args.argv)
    work = Path(args.dir)
    if args.worker:
        worker(args, work)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    prepare(args, work)
    if args.prepare_only:
        return 0
    if args.model == "sdxl":
        noise = np.random.default_rng(0).standard_normal((1, 4, args.size // 8, args.size // 8), dtype=np.float32)
    else:
        noise = np.zeros(1, np.float32)  # IF: each engine draws its own
    np.save(work / f"{args.model}-noise.npy", noise)
    text = table(args, run_worker(args, "eager"), run_worker(args, "keystep"))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
