"""The peer row of ``bench.cpu --workload unet``: optimum-intel's ``OVStableDiffusionPipeline`` on the same diffusers
directory, OpenVINO IR reshaped to static shapes (optimum-intel's documented fast path), f32 or bf16.

Run by ``bench.cpu`` with ``--peer-python``: the Python of a separate venv holding ``optimum-intel[openvino]``
(it pins its own diffusers/transformers and pulls torchvision, none of which may enter keystep's venv). So this file
imports nothing from keystep and runs as a plain script:

    PEER/bin/python tools/bench/optimum_peer.py --sd-dir DIR --precision bf16 --size 128 --steps 50 --result F.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd-dir", required=True, help="a diffusers StableDiffusionPipeline directory")
    parser.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default="a handwritten 7")
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)

    from importlib.metadata import version

    import numpy as np
    import torch
    from optimum.intel import OVStableDiffusionPipeline

    torch.set_num_threads(os.cpu_count() or 1)
    sd_dir = Path(args.sd_dir)
    ir_dir = sd_dir.parent / "optimum-ir"
    if not (ir_dir / "model_index.json").is_file():  # export once (torch -> OpenVINO IR), then reuse
        OVStableDiffusionPipeline.from_pretrained(sd_dir, export=True, compile=False).save_pretrained(ir_dir)
    pipe = OVStableDiffusionPipeline.from_pretrained(
        ir_dir, compile=False, ov_config={"INFERENCE_PRECISION_HINT": args.precision, "PERFORMANCE_HINT": "LATENCY"})
    pipe.reshape(batch_size=1, height=args.size, width=args.size, num_images_per_prompt=1)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    z_T = np.random.default_rng(0).standard_normal((1, 4, args.size // 8, args.size // 8), dtype=np.float32)

    times = []
    for i in range(args.repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        pipe(args.prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
             guidance_scale=args.guidance, latents=torch.from_numpy(z_T), output_type="latent")
        if i:
            times.append(time.perf_counter() - t0)
    label = (f"optimum-intel {version('optimum-intel')} OVStableDiffusionPipeline {args.precision} "
             "(static shapes)")
    Path(args.result).write_text(json.dumps({
        "engine": f"optimum-{args.precision}", "backend": label,
        "median": {"baseline `all`": statistics.median(times)},
        "spread": {"baseline `all`": (min(times), max(times))}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
