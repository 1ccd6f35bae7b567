"""``keystep generate`` for text-to-video bundles: sample, then write the latents and a .gif/.mp4 per video."""

from __future__ import annotations

import numpy as np

from keystep.runtime.sampler import SamplingError
from keystep.runtime.video_output import check_video_path, write_videos
from keystep.runtime.video_sampler import VideoSampler


def generate_video(bundle, backend, options, init_noise, args) -> int:
    if not args.prompt:
        raise SamplingError("a text-to-video bundle needs --prompt")
    if args.control_image:
        raise SamplingError("--control-image applies to text-to-image bundles with a ControlNet")
    if args.out:
        check_video_path(args.out)  # a bad suffix or a missing MP4 writer fails before minutes of sampling
    sampler = VideoSampler(bundle, backend)
    prompts = args.prompt * args.images if len(args.prompt) == 1 else args.prompt
    result = sampler.sample(prompts, options, negative_prompt=args.negative_prompt, height=args.height,
                            width=args.width, init_noise=init_noise, seed=args.seed, num_frames=args.frames)
    if args.save_latents:
        np.save(args.save_latents, result.latents.astype(np.float32))
        print(f"wrote latents {args.save_latents} {result.latents.shape} (videos, C, frames, H, W)")
    if args.out:
        for path in write_videos(sampler.decode(result.latents), args.out, args.fps):
            print(f"wrote {path}")
    plan = result.prepared.plan
    kind = "baseline" if plan.baseline else f"{len(plan.key_steps)} key steps of {plan.num_steps}"
    frames = result.latents.shape[2]
    print(f"{kind}: {len(result.prepared.calls)} stage calls, {frames} frames, {result.total_seconds:.2f} s sampling")
    return 0
