"""Load, soak and fault runs against a real tritonserver serving a shipped digits bundle (issue 15).

    python -m keystep.tools.bench.serve [--model digits-dit] [--clients 1 4 16] [--requests 48] [--soak 500]
                                        [--stage-calls in-process bls] [--faults] [--markdown FILE]

Load: C concurrent tritonclient clients send M requests in all (one image each, class/prompt and seed varying);
every image is compared with the one the Python API (== the CLI, tests/test_serving.py) makes for the same seed,
so a lost or mixed-up request shows; throughput and p50/p95 latency per C, with Triton's dynamic batching on and
off side by side (the same repository but for the ``dynamic_batching`` block). Soak: N requests from 4 clients;
RSS of the server and its Python stubs before and after. Faults: a client that disconnects mid-request, a stage
model's stub killed, the server restarted between requests — each outcome is recorded, every call has a timeout.
"""

from __future__ import annotations

import argparse
import os
import signal
import site
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..cli.args import list_flag
from .common import cpu_name, emit

TIMEOUT = 120.0


def process_tree_rss(pid: int) -> int:
    """RSS bytes of a process and all its descendants (the server and its Python-backend stubs), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) * 1024
        except (OSError, StopIteration):
            pass
    return total


class Workload:
    """Requests and their reference images (the Python API's, in this process, before the server starts)."""

    def __init__(self, bundle: Path, steps: int, count: int):
        import keystep

        self.pipe = keystep.load(bundle)
        self.text = self.pipe.family == "unet"
        self.steps = steps
        self.jobs = [(i % 10, 1000 + i) for i in range(count)]
        self.reference = {}

    def inputs(self, job) -> dict[str, np.ndarray]:
        digit, seed = job
        main = {"prompt": np.array([[f"a handwritten {digit}".encode()]], object)} if self.text else \
            {"class_label": np.array([[digit]], np.int64)}
        return {**main, "seed": np.array([[seed]], np.int64), "steps": np.array([[self.steps]], np.int32)}

    def expected(self, job) -> np.ndarray:
        if job not in self.reference:
            digit, seed = job
            kwargs = {"prompt": f"a handwritten {digit}"} if self.text else {"class_labels": [digit]}
            image = self.pipe(**kwargs, seed=seed, num_inference_steps=self.steps, output_type="np").images[0]
            self.reference[job] = np.round(image * 255).astype(np.uint8)
        return self.reference[job]


def send(url: str, inputs: dict[str, np.ndarray], timeout: float = TIMEOUT) -> np.ndarray:
    import tritonclient.http as http

    names = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(object): "BYTES"}
    client = http.InferenceServerClient(url, connection_timeout=10.0, network_timeout=timeout)
    try:
        tensors = []
        for name, value in inputs.items():
            tensor = http.InferInput(name, list(value.shape), names[value.dtype])
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        return client.infer("keystep", tensors, outputs=[http.InferRequestedOutput("image")]).as_numpy("image")[0]
    finally:
        client.close()


def load_run(url: str, work: Workload, jobs: list, clients: int) -> dict:
    """``clients`` threads, each with its own connection, send ``jobs``; latency per request, images checked."""
    latencies, wrong, errors = [], 0, []
    lock = threading.Lock()

    def one(job):
        nonlocal wrong
        t0 = time.perf_counter()
        try:
            image = send(url, work.inputs(job))
        except Exception as exc:  # counted, reported
            with lock:
                errors.append(f"{job}: {exc}")
            return
        with lock:
            latencies.append(time.perf_counter() - t0)
            wrong += not np.array_equal(image, work.expected(job))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, jobs))
    wall = time.perf_counter() - start
    q = np.percentile(latencies, [50, 95]) if latencies else [float("nan")] * 2
    return {"clients": clients, "requests": len(jobs), "ok": len(latencies), "wrong_images": wrong,
            "errors": errors[:3], "throughput": len(latencies) / wall, "p50": float(q[0]), "p95": float(q[1])}


def write_repo(bundle: Path, root: Path, stage_calls: str, dynamic_batching: bool, max_batch: int):
    from ..serve.repository import RepositoryOptions, write_repository
    from ..serve.server import find_tritonserver, stub_environment

    env = stub_environment(find_tritonserver())
    options = RepositoryOptions(stage_calls=stage_calls, dynamic_batching=dynamic_batching, max_batch=max_batch,
                                site_dirs=tuple(site.getsitepackages()), execution_env=str(env) if env else None)
    name = f"{stage_calls}-{'batching' if dynamic_batching else 'nobatching'}"
    return write_repository(bundle, root / name, options)


def stub_pids(server_pid: int, model: str) -> list[int]:
    """The Python-backend stub processes of ``model`` (their command line names the instance)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "triton_python_backend_stub" in cmdline and f"/{model}/" in cmdline:
                pids.append(int(entry.name))
    return pids


def faults(bundle: Path, root: Path, work: Workload) -> list[dict]:
    """The three fault scenarios on a BLS repository (stage models as separate stubs)."""
    from ..serve.server import TritonServer, find_tritonserver

    repo = write_repo(bundle, root, "bls", True, 4)
    outcomes = []
    job = work.jobs[0]
    server = TritonServer(repo, find_tritonserver()).start()
    try:
        # 1. a client that gives up mid-request (its socket closes while the request runs)
        t0 = time.perf_counter()
        try:
            send(server.http_url, work.inputs(job), timeout=0.05)
            early = "the request finished within 50 ms"
        except Exception as exc:  # the client's own timeout
            early = f"client gave up after {time.perf_counter() - t0:.2f} s ({type(exc).__name__})"
        ok = np.array_equal(send(server.http_url, work.inputs(job)), work.expected(job))
        outcomes.append({"fault": "client disconnects mid-request", "observed": early,
                         "next request": "correct image" if ok else "WRONG image", "server alive": server.ready()})
        # 2. a stage model's stub process killed
        victims = stub_pids(server.process.pid, "keystep_decoder")
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)
        results = []
        for _ in range(3):
            try:
                image = send(server.http_url, work.inputs(job), timeout=60)
                results.append("correct image" if np.array_equal(image, work.expected(job)) else "WRONG image")
            except Exception as exc:
                results.append(f"error: {str(exc).strip().splitlines()[0][:160]}")
            time.sleep(1.0)
        outcomes.append({"fault": f"stage model keystep_decoder's stub killed (pids {victims})",
                         "next requests": results, "server alive": server.ready(),
                         "stub restarted": bool(stub_pids(server.process.pid, "keystep_decoder"))})
    finally:
        server.stop()
    # 3. the server restarted between requests (same ports)
    ports = dict(http_port=server.http_port, grpc_port=server.grpc_port, metrics_port=server.metrics_port)
    try:
        send(server.http_url, work.inputs(job), timeout=5)
        down = "answered while stopped?"
    except Exception as exc:
        down = f"refused at once ({type(exc).__name__})"
    server = TritonServer(repo, find_tritonserver(), **ports).start()
    try:
        ok = np.array_equal(send(server.http_url, work.inputs(job)), work.expected(job))
        outcomes.append({"fault": "server restarted between requests", "while stopped": down,
                         "after restart": "correct image" if ok else "WRONG image"})
    finally:
        server.stop()
    return outcomes


def run(args) -> dict:
    from keystep.tools.cli import main as cli

    from ..serve.server import TritonServer, find_tritonserver

    root = Path(tempfile.mkdtemp(prefix="keystep-serve-bench-"))
    bundle = root / "bundle"
    if cli(["build", args.model, "--out", str(bundle)]) != 0:
        raise SystemExit("build failed")
    work = Workload(bundle, args.steps, max(args.requests, args.soak))
    for job in work.jobs:  # references first: computing them during a run would compete with the server
        work.expected(job)
    report = {"machine": cpu_name(), "model": args.model, "steps": args.steps, "load": [], "soak": None, "faults": []}
    for calls in args.stage_calls:
        for batching in (True, False):
            repo = write_repo(bundle, root, calls, batching, args.max_batch)
            with TritonServer(repo, find_tritonserver()) as server:
                send(server.http_url, work.inputs(work.jobs[0]))  # warm-up: sessions load on first use
                for clients in args.clients:
                    row = load_run(server.http_url, work, work.jobs[: args.requests], clients)
                    row.update(stage_calls=calls, dynamic_batching=batching)
                    report["load"].append(row)
                    print(row, file=sys.stderr)
                if args.soak and batching and calls == args.stage_calls[0]:
                    before = process_tree_rss(server.process.pid)
                    soak = load_run(server.http_url, work, work.jobs[: args.soak], 4)
                    after = process_tree_rss(server.process.pid)
                    report["soak"] = {**soak, "rss_before_mb": before / 2**20, "rss_after_mb": after / 2**20,
                                      "rss_growth": after / before - 1, "stage_calls": calls}
                    print(report["soak"], file=sys.stderr)
    if args.faults:
        report["faults"] = faults(bundle, root, work)
    return report


def to_markdown(report: dict, command: str) -> str:
    lines = [f"Command: `{command}` — {report['machine']}, 2 cores; model `{report['model']}`, "
             f"{report['steps']} steps, one image per request.", "",
             "| stage calls | dynamic batching | clients | requests | images wrong | errors | req/s | p50 s | p95 s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["load"]:
        lines.append(f"| {r['stage_calls']} | {'on' if r['dynamic_batching'] else 'off'} | {r['clients']} | "
                     f"{r['requests']} | {r['wrong_images']} | {r['requests'] - r['ok']} | {r['throughput']:.2f} | "
                     f"{r['p50']:.3f} | {r['p95']:.3f} |")
    if report["soak"]:
        s = report["soak"]
        lines += ["", f"Soak ({s['stage_calls']}, dynamic batching on, 4 clients): {s['ok']} of {s['requests']} "
                      f"requests ok, {s['wrong_images']} wrong images; RSS of server + stubs {s['rss_before_mb']:.0f} MB "
                      f"-> {s['rss_after_mb']:.0f} MB ({100 * s['rss_growth']:+.1f} %), {s['throughput']:.2f} req/s."]
    for f in report["faults"]:
        lines.append(f"- **{f['fault']}**: " + "; ".join(f"{k}: {v}" for k, v in f.items() if k != "fault"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-dit")
    parser.add_argument("--steps", type=int, default=50)
    list_flag(parser, "--clients", type=int, default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--soak", type=int, default=500)
    parser.add_argument("--max-batch", type=int, default=8)
    list_flag(parser, "--stage-calls", default=["in-process", "bls"], choices=["in-process", "bls"])
    parser.add_argument("--faults", action="store_true")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    report = run(args)
    command = "python -m keystep.tools.bench.serve " + " ".join(argv if argv is not None else sys.argv[1:])
    emit(to_markdown(report, command), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
