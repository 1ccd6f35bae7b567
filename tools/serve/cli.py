"""``keystep triton`` (write a model repository) and ``keystep serve`` (write one and run Triton on it)."""

from __future__ import annotations

import hashlib
import json
import signal
import site
import sys
import time
from dataclasses import replace
from pathlib import Path

from .repository import STAGE_CALLS, STAGE_FLAVOURS, RepositoryOptions, write_repository


def add_repository_arguments(p, list_flag, serving: bool) -> None:
    g = p.add_argument_group("model repository")
    if not serving:
        g.add_argument("--stage-backend", choices=STAGE_FLAVOURS, default="python",
                       help="stage models: tensorrt (engines from `keystep engines`), onnxruntime (the bundle's ONNX), "
                       "python (keystep's CPU backend in a Python-backend model)")
    g.add_argument("--stage-calls", choices=STAGE_CALLS, default="bls" if not serving else "in-process",
                   help="where the orchestrator's stage calls go: BLS requests to the stage models, or in-process "
                   "(one Python model runs everything; python flavour only)")
    g.add_argument("--name", default="keystep", help="the orchestrator model's name (stage models: NAME_<stage>)")
    g.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "openvino"],
                   help="keystep's CPU backend for in-process and python stages")
    g.add_argument("--threads", type=int, help="intra-op threads per stage session")
    g.add_argument("--instances", type=int, default=1, help="orchestrator instances (Python stub processes)")
    g.add_argument("--stage-instances", type=int, default=1, help="instances of each stage model")
    g.add_argument("--max-batch", type=int, default=4, help="images Triton may merge into one run (and the stage "
                   "models' batch profiles)")
    g.add_argument("--no-dynamic-batching", dest="dynamic_batching", action="store_false",
                   help="every request runs alone")
    g.add_argument("--queue-delay-us", type=int, default=10_000, help="how long a request may wait to be merged")
    list_flag(g, "--plan", dest="plans", help="plans the stage models must serve (default: default and all)")
    if not serving:
        g.add_argument("--ort-tensorrt", action="store_true", help="onnxruntime flavour: TensorRT accelerator, fp16")
        g.add_argument("--cpu-stages", dest="gpu", action="store_false", help="tensorrt/onnxruntime stages on CPU")
        list_flag(g, "--site-packages", dest="site_dirs", help="directories added to the stubs' sys.path (where "
                  "keystep is installed, if not in the server's Python)")
        g.add_argument("--execution-env", help="EXECUTION_ENV_PATH for the Python-backend models (a conda-pack "
                       "tarball or a venv directory)")


def options_from_args(args, serving: bool) -> RepositoryOptions:
    return RepositoryOptions(
        stage_backend=getattr(args, "stage_backend", "python"), stage_calls=args.stage_calls, name=args.name,
        instances=args.instances, stage_instances=args.stage_instances, max_batch=args.max_batch,
        dynamic_batching=args.dynamic_batching, queue_delay_us=args.queue_delay_us, backend=args.backend,
        threads=args.threads, ort_tensorrt=getattr(args, "ort_tensorrt", False), gpu=getattr(args, "gpu", not serving),
        plans=tuple(args.plans or ("default", "all")), site_dirs=tuple(getattr(args, "site_dirs", None) or ()),
        execution_env=getattr(args, "execution_env", None))


def cmd_triton(args) -> int:
    out = write_repository(args.bundle, args.out, options_from_args(args, serving=False))
    print(f"wrote Triton model repository {out} (see {out / 'README.md'})")
    return 0


def add_serve_arguments(p, list_flag) -> None:
    p.add_argument("bundle", nargs="?", help="the bundle to serve")
    p.add_argument("--check", action="store_true", help="only say whether a tritonserver is usable here, and why not")
    p.add_argument("--tritonserver", help="the server binary (default: $TRITONSERVER, the nvidia-pytriton wheel's, "
                   "or tritonserver on PATH)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0: a free one)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0: a free one)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (0: a free one)")
    p.add_argument("--repository", help="where to write the repository (default: keystep's cache directory)")
    add_repository_arguments(p, list_flag, serving=True)


def serve_repository_dir(bundle: Path, options: RepositoryOptions) -> Path:
    from .server import cache_dir

    manifest = (bundle / "manifest.json").read_bytes()
    key = hashlib.sha256(manifest + json.dumps(vars(options), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_dir() / "serve" / f"{bundle.resolve().name}-{key}"


def cmd_serve(args) -> int:
    from .server import ServerError, TritonServer, check_report, find_tritonserver, stub_environment

    if args.check:
        ok, report = check_report(args.tritonserver)
        print(("ok: " if ok else "not available: ") + report)
        return 0 if ok else 1
    if not args.bundle:
        raise ServerError("give the bundle to serve (or --check)")
    binary = find_tritonserver(args.tritonserver)
    env = stub_environment(binary, progress=lambda m: print(m, file=sys.stderr))
    options = replace(options_from_args(args, serving=True), site_dirs=tuple(site.getsitepackages()),
                      execution_env=str(env) if env else None)
    bundle = Path(args.bundle)
    repo = write_repository(bundle, args.repository or serve_repository_dir(bundle, options), options)
    server = TritonServer(repo, binary, host=args.host, http_port=args.port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # explicit: a shell starts background jobs with SIGINT ignored
        signal.signal(sig, lambda *a: stop.append(True))
    server.start()
    try:
        print(f"serving {bundle} as model '{options.name}' from {repo}\n"
              f"  HTTP    http://{server.http_url}  (keystep request --url {server.http_url} ...)\n"
              f"  gRPC    {server.grpc_url}\n  metrics {server.metrics_url}\n  log     {server.log_path}\n"
              f"Ctrl-C stops.", flush=True)
        while not stop and server.process.poll() is None:
            time.sleep(0.5)
        if server.process.poll() is not None:
            raise ServerError(f"tritonserver exited with code {server.process.returncode}: {server.log_tail()}")
    finally:
        code = server.stop()
        print(f"tritonserver stopped (exit code {code})", file=sys.stderr)
    return 0
