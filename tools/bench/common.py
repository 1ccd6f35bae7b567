"""What every benchmark shares: the plans compared, interleaved timing rounds, and the markdown table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from keystep.runtime.sampler import SamplingOptions

# row name -> (key-step spec, batch a group's decoders into one call)
PLANS = {"baseline": ("all", True), "key-step": ("default", True), "key-step, sequential": ("default", False)}
EAGER = "diffusers eager"


def save_random_sd_pipeline(pipeline_class, path: Path, unet, text_width: int, **components):
    """``pipeline_class`` (a diffusers SD-style pipeline) around ``unet``, saved to ``path`` with the small random
    parts the UNet benchmarks share: a VAE, a 2-layer CLIP text encoder ``text_width`` wide, a byte-level CLIP
    tokenizer without merges and SD's DDIM scheduler. Their weights come from torch's RNG after the UNet's."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from keystep.runtime.tokenizer import bytes_to_unicode

    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=text_width, intermediate_size=4 * text_width, num_attention_heads=text_width // 64,
        num_hidden_layers=2, vocab_size=1000, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
        pad_token_id=513))
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = pipeline_class(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                          scheduler=scheduler, **components)
    pipe.save_pretrained(path)
    (path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    return path


def one_model_main(module: str, doc: str, run, describe, repeats: int, flag: str, **flag_options):
    """The ``main(argv)`` of a benchmark of one model against diffusers: ``flag`` (argparse ``flag_options``) picks
    the model, then ``--steps``, ``--repeats`` and ``--markdown``; it runs ``run(model, steps, repeats)`` and reports
    the table with the command that reruns it, ``describe(model)`` saying what ran."""

    def main(argv=None) -> int:
        parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
        parser.add_argument(flag, **flag_options)
        parser.add_argument("--steps", type=int, default=50)
        parser.add_argument("--repeats", type=int, default=repeats)
        parser.add_argument("--markdown", help="also write the table to this file")
        args = parser.parse_args(argv)
        model = getattr(args, flag.lstrip("-").replace("-", "_"))
        r = run(model, args.steps, args.repeats)
        command = f"python -m {module} {flag} {model} --steps {args.steps} --repeats {args.repeats}"
        report(r, command, describe(model), args.markdown)
        return 0

    return main


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def measure(sampler, sample, eager, steps: int, guidance: float, repeats: int, images: int) -> dict:
    """Interleaved rounds (eager, then every plan), the first a warm-up. ``sample(options)`` runs the keystep
    sampler, ``eager()`` the diffusers loop; both return final latents."""
    options = {
        name: SamplingOptions.from_bundle(sampler.bundle, num_steps=steps, key_steps=spec, guidance=guidance,
                                          parallel=batched)
        for name, (spec, batched) in PLANS.items()
    }
    times: dict[str, list[float]] = {EAGER: [], **{name: [] for name in PLANS}}
    host: dict[str, list[float]] = {name: [] for name in PLANS}
    latents = {}
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        latents[EAGER] = eager()
        if i:
            times[EAGER].append(time.perf_counter() - t0)
        for name in PLANS:
            result = sample(options[name])
            latents[name] = result.latents
            if i:
                times[name].append(result.total_seconds)
                host[name].append(result.host_seconds / result.total_seconds)
    prepared = {name: sampler.prepare(options[name], images) for name in PLANS}
    flops = {name: sampler.plan_flops(p) for name, p in prepared.items()}
    flops[EAGER] = flops["baseline"]
    return {
        "steps": steps,
        "repeats": repeats,
        "guidance": guidance,
        "median": {k: statistics.median(v) for k, v in times.items()},
        "spread": {k: (min(v), max(v)) for k, v in times.items()},
        "host_fraction": {k: statistics.median(v) for k, v in host.items()},
        "calls": {name: len(p.calls) for name, p in prepared.items()},
        "key_steps": len(prepared["key-step"].plan.key_steps),
        "evaluations": prepared["key-step"].plan.num_steps,
        "flops": flops,
        "max_abs_diff_baseline_vs_eager": float(np.abs(latents["baseline"] - latents[EAGER]).max()),
    }


def to_markdown(r: dict, command: str, what: str, unit: str = "image") -> str:
    eager, base = r["median"][EAGER], r["median"]["baseline"]
    lines = [
        f"`{command}` — {cpu_name()}, {os.cpu_count()} cores; {what}; {r['steps']} steps, CFG {r['guidance']}, "
        f"batch 1, median of {r['repeats']} interleaved runs",
        "",
        f"| row | s/{unit} (median) | min–max | vs diffusers | vs baseline | GFLOP | FLOP bound vs baseline | host share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in r["median"]:
        t, (lo, hi) = r["median"][name], r["spread"][name]
        bound = r["flops"]["baseline"] / r["flops"][name]
        host = r["host_fraction"].get(name)
        lines.append(
            f"| {name} | {t:.3f} | {lo:.3f}–{hi:.3f} | {eager / t:.2f}× | {base / t:.2f}× | "
            f"{r['flops'][name] / 1e9:.1f} | {bound:.3f}× | {'—' if host is None else f'{100 * host:.2f} %'} |"
        )
    lines.append("")
    for name in [n for n in ("key-step", "key-step, sequential") if n in r["median"]]:
        speedup = base / r["median"][name]
        bound = r["flops"]["baseline"] / r["flops"][name]
        lines.append(
            f"{name}: {r['key_steps']} key steps of {r['evaluations']} model evaluations, {r['calls'][name]} stage "
            f"calls (baseline {r['calls']['baseline']}); speedup {speedup:.3f}× = {speedup / bound:.3f} × the FLOP "
            f"bound {bound:.3f}×."
        )
    lines.append(f"Baseline vs diffusers eager latents: max |diff| {r['max_abs_diff_baseline_vs_eager']:.2e}.")
    return "\n".join(lines)


def report(r: dict, command: str, what: str, markdown: str | None, unit: str = "image") -> None:
    """Print the table (and the build time) and write it to ``markdown`` when given."""
    emit(to_markdown(r, command, what, unit) + f"\nBundle build: {r['build_seconds']:.1f} s.", markdown)


def emit(text: str, markdown: str | None) -> None:
    """Print a benchmark's report and, when asked, write it to a Markdown file too."""
    print(text)
    if markdown:
        Path(markdown).write_text(text + "\n")
