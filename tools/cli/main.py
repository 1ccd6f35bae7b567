"""The ``keystep`` command line: argument parsing and printing over the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys

from keystep.runtime.backends.base import backend_names
from keystep.runtime.bundle import Bundle
from keystep.runtime.errors import KeystepError
from keystep.runtime.request import PlanArguments, RequestError, validate_options
from keystep.runtime.sampler import SamplingError, SamplingOptions
from keystep.runtime.schedulers import SCHEDULERS

from .args import Parser, list_flag
from .inspect_bundle import describe_bundle, format_description

SCHEDULER_NAMES = sorted(SCHEDULERS)

GENERATE_EXAMPLES = """sample images from a bundle

a PNG from every shipped model (build once, then generate):
  keystep build digits-dit --out dit && keystep generate dit --class 3 --out three.png
  keystep build digits-dydit-0.5 --out dydit5 && keystep generate dydit5 --class 7 --out seven.png
  keystep build digits-dydit-0.7 --out dydit7 && keystep generate dydit7 --class 1 2 --out digits.png
  keystep build digits-sd --out sd && keystep generate sd --prompt "a handwritten 7" --out seven.png

several prompts or classes: repeat the flag or list values (--prompt "a 3" --prompt "a 7"; --class 1 2 --class 3);
several images are written as NAME-0.png, NAME-1.png, ...; without --out an image bundle writes BUNDLE_NAME.png"""


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, help="number of sampling steps")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, help="scheduler (default: the bundle's)")
    p.add_argument("--key-steps", help="'default', 'all' (baseline), 'uniform:M' or a list like 0,1,2,5")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (<= 1 disables CFG)")
    p.add_argument("--cache", help="feature caching VARIANT:SCHEDULE[@START], e.g. deep0:uniform:3, blocks2-9:quad:3, "
                   "deep0:uniform:3@20 (key-step plan before step 20); 'none' turns the default's off")
    p.add_argument("--parallel", dest="parallel", action="store_true", default=None,
                   help="batch each group's decoders into one call (default on GPU backends)")
    p.add_argument("--no-parallel", dest="parallel", action="store_false",
                   help="run the decoders one step at a time (default on CPU backends: measured faster)")
    p.add_argument("--max-decoder-batch", type=int, help="largest decoder batch (rows = steps x CFG x images)")
    p.add_argument("--no-noise-injection", action="store_true", help="turn off prior noise injection")


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=backend_names(),
                   help="default: $KEYSTEP_BACKEND or auto, the fastest CPU backend/precision for this CPU (OpenVINO "
                   "bf16 where the CPU has native bf16, else OpenVINO f32, else ONNX Runtime)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
    p.add_argument("--precision", choices=["f32", "bf16"],
                   help="openvino (or auto) inference precision (default: openvino f32; auto bf16 where native)")
    p.add_argument("--device", type=int, default=0, help="CUDA device (GPU backends)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="GPU backends: plain execution instead of one CUDA graph per distinct call")


def backend_options(args) -> dict:
    """The backend's options from the flags (validated by keystep.runtime.pipeline.make_backend)."""
    return {"threads": args.threads, "precision": args.precision, "device": args.device,
            "cuda_graphs": args.cuda_graphs}


def backend_from_args(args):
    from keystep.runtime.pipeline import make_backend

    return make_backend(args.backend, **backend_options(args))


def plan_arguments(args) -> dict:
    """The plan flags in the API's vocabulary (keystep.runtime.request)."""
    return dict(num_inference_steps=args.steps, guidance_scale=args.guidance, key_steps=args.key_steps,
                cache=args.cache, scheduler=args.scheduler, parallel=args.parallel,
                max_decoder_batch=args.max_decoder_batch, noise_injection=False if args.no_noise_injection else None)


def options_from_args(bundle: Bundle, args) -> SamplingOptions:
    """The plan the flags ask for, checked by the same layer the Python API uses."""
    return validate_options(bundle, PlanArguments(**plan_arguments(args)))


def cmd_build(args) -> int:
    try:
        from keystep.export.build import build_bundle
    except ImportError as exc:
        raise SystemExit(f"keystep build needs the export extra (pip install 'keystep[export]'): {exc}") from exc
    # check TensorRT and the GPU before exporting: a missing one fails in a second, not after the export
    environment = _trt_environment(args) if args.backend == "tensorrt" else None
    options = {} if args.guidance is None else {"guidance": args.guidance}
    width = {"width": args.width, "max_profiles": args.max_profiles, "token_skip": args.token_skip,
             "cache": args.cache, "frames": args.frames, "full": False if args.no_full else None}
    options.update({k: v for k, v in width.items() if v is not None})
    out = build_bundle(
        args.model,
        args.out,
        controlnet=args.controlnet,
        super_resolution=args.super_resolution or (),
        split=args.split,
        scheduler=args.scheduler,
        scheduler_config=args.scheduler_config,
        steps=args.steps,
        key_steps=args.key_steps,
        num_heads=args.num_heads,
        precision=args.precision,
        progress=lambda msg: print(msg, file=sys.stderr),
        **options,
    )
    print(f"wrote bundle {out}")
    if environment is not None:
        return build_engines_from_args(out, args, environment)
    return 0


def cmd_generate(args) -> int:
    from .generate import cmd_generate as generate

    return generate(args, backend_options(args), plan_arguments(args))


def cmd_inspect(args) -> int:
    bundle = Bundle.load(args.bundle, verify=not args.no_verify)
    if bundle.family == "cascade":
        from .cascade import describe_cascade, format_cascade

        description = describe_cascade(bundle, args, options_from_args, describe_bundle)
        print(json.dumps(description, indent=2) if args.json else format_cascade(description, format_description))
        return 0
    options = options_from_args(bundle, args)
    description = describe_bundle(bundle, options, images=args.images)
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    return 0


def cmd_profile(args) -> int:
    from .profile import run_profile_command

    bundle = Bundle.load(args.bundle)
    return run_profile_command(args, bundle, options_from_args(bundle, args), backend_from_args(args))


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.dir, steps=args.steps, samples=args.samples)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TensorRT engines")
    g.add_argument("--engine-plan", dest="engine_plans", action="append",
                   help="a plan the engines must serve (repeatable; default: the bundle's default plan and 'all'); "
                   "each engine's batch profile spans these plans' calls")
    list_flag(g, "--engine-images", type=int, default=[1], help="images per generate call to serve (repeatable)")
    g.add_argument("--engine-max-decoder-batch", type=int, help="largest decoder batch the runs will use")
    g.add_argument("--engine-height", type=int, help="image height in pixels (UNet; default the model's)")
    g.add_argument("--engine-width", type=int, help="image width in pixels (UNet; default the model's)")
    g.add_argument("--opt-level", type=int, default=3, choices=range(6), help="TensorRT builder optimisation level")
    g.add_argument("--tf32", action="store_true", help="allow TF32 for float32 layers")
    g.add_argument("--refit", action="store_true", help="build refittable engines (weights swappable; slower)")
    g.add_argument("--timing-cache", help="TensorRT timing cache file to load and update (development builds)")
    g.add_argument("--device", type=int, default=0, help="CUDA device")


def build_engines_from_args(bundle_dir, args, environment=None) -> int:
    from keystep.graphs.trt_build import EngineBuildOptions, build_engines
    from keystep.runtime.engine_plan import EngineTargets

    bundle = Bundle.load(bundle_dir)
    if bundle.family == "cascade":
        raise SamplingError(f"TensorRT engines are built per diffusion stage of a cascade: keystep engines "
                            f"{bundle.root}/<stage> (the cascade's T5 stage has no engine path yet)")
    scale = bundle.model_config.get("vae_scale_factor", 1)
    sizes = {axis: px // scale for axis, px in (("height", args.engine_height), ("width", args.engine_width)) if px}
    targets = EngineTargets(tuple(args.engine_plans or ("default", "all")), tuple(args.engine_images),
                            args.engine_max_decoder_batch)
    options = EngineBuildOptions(args.opt_level, args.tf32, args.refit, args.timing_cache)
    index = build_engines(bundle_dir, targets, options, sizes, environment or _trt_environment(args))
    print(f"{len(index.engines)} TensorRT {index.tensorrt_version} engines for {index.gpu} in {bundle_dir}/engines")
    return 0


def _trt_environment(args):
    from keystep.graphs.trt_build import tensorrt_environment

    return tensorrt_environment(args.device)


def cmd_engines(args) -> int:
    return build_engines_from_args(args.bundle, args)


def cmd_triton(args) -> int:
    from keystep.tools.serve.cli import cmd_triton as triton

    return triton(args)


def cmd_serve(args) -> int:
    from keystep.tools.serve.cli import cmd_serve as serve

    return serve(args)


def cmd_request(args) -> int:
    from keystep.tools.serve.client import cmd_request as request

    return request(args)


def cmd_models(args) -> int:
    from keystep.models import SHIPPED

    print(f"{'name':<18} {'size':>9}  what")
    for m in SHIPPED.values():
        size = f"{m.size_bytes / 1e6:.2f} MB" if m.available else "missing"
        print(f"{m.name:<18} {size:>9}  {m.description}")
    return 0


def cmd_quality(args) -> int:
    from .quality import run_quality_command

    return run_quality_command(args, Bundle.load(args.bundle), backend_from_args(args))


def cmd_tune(args) -> int:
    from keystep.runtime.samplers import sampler_for

    from .tune import format_record, tune, write_tuned_plan

    bundle = Bundle.load(args.bundle)
    if bundle.family == "cascade":
        raise SamplingError(f"tune one diffusion stage of the cascade: keystep tune {bundle.root}/<stage> (stages: "
                            f"{', '.join(p['name'] for p in bundle.manifest['cascade'])})")
    options = options_from_args(bundle, args)
    sampler = sampler_for(bundle, backend_from_args(args))
    classes = args.class_labels or list(range(min(4, bundle.model_config.get("num_classes", 0))))
    record = tune(bundle, sampler, options, args.target_speedup, args.budget_flops, args.by, args.method, args.seeds,
                  classes=classes if bundle.family == "dit" else None,
                  prompts=(args.prompt or ["a photo", "a drawing"]) if bundle.family != "dit" else None,
                  progress=lambda t: print(f"  tried {t.plan}: PSNR {t.psnr:.2f} dB", file=sys.stderr))
    if not args.dry_run:
        write_tuned_plan(bundle, record)
    print(json.dumps(record, indent=2) if args.json else format_record(record))
    print(f"chosen plan: {record['chosen']}" + ("" if args.dry_run else f" (written to {bundle.root})"))
    return 0


def cmd_check(args) -> int:
    from keystep.graphs.trt_check import check_tensorrt, format_issues

    bundle = Bundle.load(args.bundle)
    names = [bundle.stage(args.stage).name] if args.stage else list(bundle.stages)
    report = {name: check_tensorrt(bundle.stage(name).path, tuple(args.static_axes)) for name in names}
    if args.json:
        print(json.dumps({name: [i.to_dict() for i in issues] for name, issues in report.items()}, indent=2))
    else:
        for name, issues in report.items():
            errors = sum(i.severity == "error" for i in issues)
            print(f"{name}: {errors} errors, {len(issues) - errors} warnings")
            if issues:
                print("  " + format_issues(issues).replace("\n", "\n  "))
    return 1 if any(i.severity == "error" for issues in report.values() for i in issues) else 0


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="keystep", description="Deployment compiler for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="turn a model into a bundle (ONNX stages + manifest)")
    p.add_argument("model", help="diffusers DiT or Stable Diffusion dir, DiT transformer dir, original DiT .pt, random:PRESET")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--split", type=int, help="encoder = blocks[:K] (default round(depth*18/28))")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, help="scheduler class stored in the bundle")
    p.add_argument("--scheduler-config", help="a diffusers scheduler_config.json (class and fields honoured)")
    p.add_argument("--steps", type=int, help="default number of steps (50; IF: stage I 100, stage II 50)")
    p.add_argument("--key-steps", help="default key-step plan (default: 'default', or a shipped model's tuned plan)")
    p.add_argument("--guidance", type=float, help="default guidance scale (DiT 4.0, UNet 7.5)")
    p.add_argument("--controlnet", help="a diffusers ControlNetModel directory (UNet models)")
    p.add_argument("--super-resolution", action="append", metavar="DIR",
                   help="DeepFloyd-IF: an IFSuperResolutionPipeline directory, the cascade's next stage (repeatable, "
                   "in order); MODEL is the IFPipeline (stage I) directory")
    p.add_argument("--cache", help="feature-caching stages to build: deep:ID[,ID...] (UNet, DeepCache branch ids "
                   "as in the deepcache package) or blocks:FIRST-LAST[,...] (DiT, block ranges skipped at cached steps)")
    p.add_argument("--no-full", action="store_true",
                   help="UNet: leave out the full graph (it repeats the encoder's and decoder's weights); the baseline "
                   "plan then runs encoder + decoder at every step; cache plans need it")
    p.add_argument("--num-heads", type=int, help="attention heads (original checkpoints: default hidden/64)")
    p.add_argument("--frames", type=int, help="text-to-video: default frame count (FLOPs are counted at it; 16)")
    p.add_argument("--precision", help="stage graph precision: fp32 (default), fp16 or bf16 (every stage but the VAE; "
                   "norms, softmax and sin/cos stay fp32) or per stage, e.g. encoder=fp16,decoder=bf16")
    p.add_argument("--width", help="width profiles: none (dense), dydit (the checkpoint's routers; the default for "
                   "DyDiT checkpoints) or calibrated:L (training-free, keep L of the blocks' FLOPs)")
    p.add_argument("--max-profiles", type=int, help="most engines per stage; more distinct masks are merged "
                   "into masked engines that add the fewest FLOPs (default 8)")
    p.add_argument("--token-skip", nargs="?", const="gather", choices=["gather", "dense"],
                   help="DyDiT token selection (on by default): gather = MLP on selected tokens only, "
                   "dense = 0/1 masking")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                   help="tensorrt: also build the TensorRT engines (see `keystep engines`); needs TensorRT and a GPU")
    p.add_argument("--no-token-skip", dest="token_skip", action="store_const", const="off",
                   help="drop the token routers (an approximation of a DyDiT checkpoint)")
    add_engine_arguments(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("generate", help="sample images from a bundle", description=GENERATE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    from .generate import add_generate_arguments

    add_generate_arguments(p, list_flag)
    add_backend_arguments(p)
    add_plan_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="print a bundle's stages, plan and FLOPs")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true")
    p.add_argument("--images", type=int, default=1, help="images per batch for the plan shown")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 verification")
    p.add_argument("--stage", dest="stages", action="append", metavar="NAME",
                   help="cascades: apply the plan flags to this diffusion stage only (repeatable)")
    add_plan_arguments(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("check", help="TensorRT compatibility of each stage graph: unsupported ops/dtypes (errors), "
                       "shapes that block CUDA graphs (warnings); exit 1 on any error")
    p.add_argument("bundle")
    p.add_argument("--stage", help="check this stage only")
    list_flag(p, "--static-axes", default=["batch"], metavar="AXIS",
                   help="symbolic axes that will be fixed per CUDA graph, not warned about (default: batch)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("profile", help="time each stage of each plan, with speedups and the hardware floor")
    from .profile import add_profile_arguments

    add_profile_arguments(p)
    add_backend_arguments(p)
    add_plan_arguments(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("tune", help="choose the plan closest to the baseline under a FLOP or time budget")
    p.add_argument("bundle")
    p.add_argument("--target-speedup", type=float, help="budget: baseline FLOPs (or time, --by time) / S")
    p.add_argument("--budget-flops", type=float, help="budget: FLOPs per run of the calibration batch")
    p.add_argument("--by", choices=["flops", "time"], default="flops", help="what the target speedup bounds")
    p.add_argument("--method", choices=["search", "similarity"], default="search",
                   help="search: try every plan kind the bundle has; similarity: key steps where encoder features "
                   "change most (one baseline run)")
    p.add_argument("--seeds", type=int, default=2, help="calibration seeds (each runs every class/prompt)")
    list_flag(p, "--class", dest="class_labels", type=int, help="calibration classes (DiT); repeatable")
    list_flag(p, "--prompt", help="calibration prompts (text-to-image); repeatable")
    p.add_argument("--dry-run", action="store_true", help="report only; leave the manifest alone")
    p.add_argument("--json", action="store_true")
    add_backend_arguments(p)
    add_plan_arguments(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", help="the shipped digits models: every plan's speed and quality side by side")
    p.add_argument("--dir", default="keystep-demo", help="where the bundles (cached) and outputs go")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samples", type=int, default=200, help="samples per plan")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("engines", help="build a bundle's TensorRT engines (on the GPU machine; cached by graph, "
                       "options, TensorRT version and GPU)")
    p.add_argument("bundle")
    add_engine_arguments(p)
    p.set_defaults(func=cmd_engines)

    from keystep.tools.serve.cli import add_repository_arguments, add_serve_arguments
    from keystep.tools.serve.client import add_request_arguments

    p = sub.add_parser("triton", help="write a Triton Inference Server model repository for a bundle")
    p.add_argument("bundle")
    p.add_argument("--out", required=True, help="the repository directory to write")
    add_repository_arguments(p, list_flag, serving=False)
    p.set_defaults(func=cmd_triton)

    p = sub.add_parser("serve", help="serve a bundle with Triton Inference Server on this machine")
    add_serve_arguments(p, list_flag)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("request", help="send one request to a keystep Triton model and write the images")
    add_request_arguments(p, list_flag)
    p.set_defaults(func=cmd_request)

    p = sub.add_parser("models", help="list the shipped models (usable wherever a model path is accepted)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("quality", help="class accuracy, digits-FD and PSNR vs baseline of a digits bundle's plans")
    from .quality import add_quality_arguments

    add_quality_arguments(p)
    add_backend_arguments(p)
    p.set_defaults(func=cmd_quality)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except RequestError as exc:
        print(f"keystep: error: {exc.for_cli()}", file=sys.stderr)
    except (KeystepError, FileExistsError) as exc:
        print(f"keystep: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("keystep: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a keystep bug: one line for the user, the traceback on request
        if os.environ.get("KEYSTEP_DEBUG"):
            raise
        print(f"keystep: internal error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
              f" (run with KEYSTEP_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 3
    return 2


if __name__ == "__main__":
    sys.exit(main())
