"""``keystep generate``: a thin layer over the Python API (:mod:`keystep.runtime.pipeline`).

Everything is checked before the first stage runs: the request (the API's validation layer), and where the
results go — an image path with a format Pillow writes, in a place that can be written, on a bundle that makes
images. Without ``--out`` or ``--save-latents`` an image bundle writes ``<bundle name>.png`` and says so; a bundle
that makes only latents refuses. Files are written whole or not at all (temp file, then rename).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from keystep.runtime.atomic import write_atomic
from keystep.runtime.bundle import Bundle
from keystep.runtime.pipeline import Pipeline, make_backend, to_pil
from keystep.runtime.request import TEXT_FAMILIES, RequestError, check_size
from keystep.runtime.sampler import SamplingError
from keystep.runtime.video_output import check_video_path, write_videos


def add_generate_arguments(p, list_flag) -> None:
    p.add_argument("bundle")
    p.add_argument("--out", help="image file (.png, .jpg, ...); several images: NAME-0.png, NAME-1.png, ... "
                   "(default: BUNDLE_NAME.png in the current directory)")
    list_flag(p, "--class", dest="class_labels", type=int, help="class label(s) of a class-conditional bundle "
              "(default 0); repeatable")
    list_flag(p, "--prompt", help="prompt(s) of a text-to-image bundle; repeatable: --prompt 'a 3' --prompt 'a 7'")
    p.add_argument("--negative-prompt", help="negative prompt (CFG's unconditional text; default empty)")
    p.add_argument("--images", type=int, default=1, help="images per prompt or class")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    p.add_argument("--control-image", help="ControlNet conditioning image (e.g. a canny edge map)")
    p.add_argument("--control-scale", type=float, default=1.0, help="ControlNet conditioning scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (0..2^63-1)")
    p.add_argument("--init-noise", help="z_T as a .npy of shape (images, C, H, W)")
    p.add_argument("--save-latents", help="write the final latents (float32 .npy)")
    p.add_argument("--frames", type=int, help="text-to-video: frames per video (default: the bundle's)")
    p.add_argument("--fps", type=float, default=8.0, help="text-to-video: frames per second of the .gif/.mp4")
    sdxl = p.add_argument_group("SDXL (StableDiffusionXLPipeline's arguments of the same names)")
    list_flag(sdxl, "--prompt-2", dest="prompt_2", help="prompt(s) for the second text encoder (default: --prompt)")
    sdxl.add_argument("--negative-prompt-2", help="negative prompt for the second text encoder")
    for flag, what in (("--original-size", "the original image size (default: the output size)"),
                       ("--crops-coords-top-left", "the crop's top-left corner Y X (default 0 0)"),
                       ("--target-size", "the target size (default: the output size)")):
        sdxl.add_argument(flag, type=int, nargs=2, metavar=("H", "W"), help=f"size conditioning: {what}")
    cascade = p.add_argument_group("DeepFloyd-IF cascades")
    cascade.add_argument("--stage", dest="stages", action="append", metavar="NAME",
                         help="apply the plan flags to this diffusion stage only (repeatable; default: every stage)")
    cascade.add_argument("--noise-level", type=int, help="super-resolution stages: the upscaled image's noise "
                         "level (default: the stage's, 250)")


def cmd_generate(args, backend_options: dict, plan_arguments: dict) -> int:
    bundle = Bundle.load(args.bundle)
    pipe = Pipeline(bundle, make_backend(args.backend, **backend_options))
    init = read_array(args.init_noise, "--init-noise") if args.init_noise else None
    control = None
    if args.control_image:
        from keystep.runtime.unet_sampler import load_control_image

        if "controlnet" not in bundle.stages:  # before reading the image (DiTs, cascades, video: none)
            raise RequestError("control_image", "this bundle has no ControlNet stage (build it with --controlnet)")
        height, width = check_size(bundle, args.height, args.width)
        control = load_control_image(args.control_image, height, width)
    class_labels = args.class_labels
    if bundle.family not in TEXT_FAMILIES and class_labels is None and not args.prompt:
        class_labels = [0]
    if args.stages:  # the plan flags for the named cascade stages only
        plan_arguments = {"stage_plans": {name: dict(plan_arguments) for name in args.stages}}
    sizes = {k: getattr(args, k) for k in ("original_size", "crops_coords_top_left", "target_size")}
    request = pipe.validate(
        prompt=args.prompt, negative_prompt=args.negative_prompt, class_labels=class_labels,
        num_images_per_prompt=args.images, height=args.height, width=args.width, seed=args.seed, latents=init,
        output_type="latent", control_image=control, controlnet_conditioning_scale=args.control_scale,
        num_frames=args.frames, prompt_2=args.prompt_2, negative_prompt_2=args.negative_prompt_2,
        noise_level=args.noise_level, **{k: v for k, v in sizes.items() if v is not None}, **plan_arguments)
    out, latents_path = output_paths(args, pipe)
    if out is not None and not args.out:
        print(f"no --out given: writing {out}")
    result = pipe.run(request)
    if latents_path:
        write_file(latents_path, lambda f: np.save(f, result.latents.astype(np.float32)))
        print(f"wrote latents {latents_path}")
    if out:
        pixels = pipe.decode(result.latents)
        if pipe.family == "unet3d":
            paths = write_videos(pixels, out, check_fps(args.fps))
        else:
            paths = image_paths(out, len(pixels))
            for path, image in zip(paths, to_pil(pixels)):
                write_file(path, lambda f, image=image, path=path: image.save(f, format=image_format(path)))
        for path in paths:
            print(f"wrote {path}")
    frames = f", {result.latents.shape[2]} frames" if pipe.family == "unet3d" else ""
    print(f"{result.plan}{frames}, {result.timing['sampling_s']:.2f} s sampling")
    return 0


def check_fps(fps: float) -> float:
    if not fps > 0 or fps == float("inf"):
        raise RequestError("fps", f"must be a positive number, got {fps}")
    return fps


def output_paths(args, pipe: Pipeline) -> tuple[Path | None, Path | None]:
    """Where the results go, checked before sampling (never compute and then fail to write, or write nothing)."""
    out = Path(args.out) if args.out else None
    latents = Path(args.save_latents) if args.save_latents else None
    if out is not None and not pipe.can_decode:
        raise RequestError("output_type", "this bundle makes latents, not images (no vae_decoder stage, not "
                           "pixel-space): use --save-latents FILE.npy")
    if out is None and latents is None:
        if not pipe.can_decode:
            raise SamplingError("this bundle makes latents, not images (no vae_decoder stage): "
                                "pass --save-latents FILE.npy")
        out = Path(f"{Path(args.bundle).resolve().name}.{'gif' if pipe.family == 'unet3d' else 'png'}")
    if out is not None:
        check_writable(out, "--out")
        check_video_path(out) if pipe.family == "unet3d" else image_format(out)
    if latents is not None:
        if latents.suffix != ".npy":
            raise SamplingError(f"--save-latents {latents}: the file is a numpy .npy, name it so")
        check_writable(latents, "--save-latents")
    return out, latents


def image_format(path: Path) -> str:
    from PIL import Image

    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise SamplingError(f"--out {path}: {path.suffix or 'no extension'} is not an image format Pillow writes "
                            f"(use .png, .jpg, .webp, ...)")
    return fmt


def check_writable(path: Path, flag: str) -> None:
    if path.is_dir():
        raise SamplingError(f"{flag} {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise SamplingError(f"{flag} {path}: cannot write in {existing}")


def image_paths(out: Path, count: int) -> list[Path]:
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def write_file(path: Path, write) -> None:
    """Whole or not at all (keystep.runtime.atomic), with a missing directory made and a failure as one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, write)
    except OSError as exc:
        raise SamplingError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_array(path: str, flag: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise SamplingError(f"cannot read {flag} {path}: {exc}") from None
