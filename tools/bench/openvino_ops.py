"""Where an OpenVINO stage spends its time: per-op-type time from OpenVINO's own counters (``PERF_COUNT``).

    python -m keystep.tools.bench.openvino_ops BUNDLE STAGE [STAGE ...] [--precision bf16] [--batch 2] [--runs 10]
                                               [--products]

Compiles each stage for static shapes at ``--batch`` rows (random inputs of the manifest's shapes), runs it
``--runs`` times after a warm-up, and prints the time per node type and kernel (``FullyConnected
[brgemm_avx512_bf16]``, ``Reorder [jit_uni_f32]``, ...), summed over the graph's nodes, with the call's wall time
and GFLOP/s. ``--products`` lists every matrix product (FullyConnected node) instead: its shapes as it ran (a
gathered MLP's rows are the tokens it selected), time and GFLOP/s. docs/benchmarks.md ("Width profiles under
bf16") is read from its output.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np


def product_shape(op) -> tuple[int, int, int] | None:
    """(rows, depth, columns) of a FullyConnected node of OpenVINO's runtime model: its input (..., depth) and its
    output (..., columns), as the last call ran them; None while a dimension is unknown."""
    data, out = op.input(0).get_partial_shape(), op.output(0).get_partial_shape()
    if data.is_dynamic or out.is_dynamic:
        return None
    dims = list(data.to_shape())
    return int(np.prod(dims[:-1])), dims[-1], out.to_shape()[-1]


def profile_stage(core, spec, precision: str, batch: int, runs: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {io.name: (rng.integers(0, 10, io.concrete(batch)) if io.dtype == "int64"
                       else rng.standard_normal(io.concrete(batch))).astype(io.dtype) for io in spec.inputs}
    model = core.read_model(str(spec.path))
    model.reshape({name: list(a.shape) for name, a in feeds.items()})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                 "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    for _ in range(3):
        request.infer(feeds)
    per_op: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    product_ms: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    for _ in range(runs):
        request.infer(feeds)
        for node in request.profiling_info:
            key = f"{node.node_type} [{node.exec_type}]"
            per_op[key] += node.real_time.total_seconds() * 1e3 / runs
            count[key] += 1 / runs
            if node.node_type == "FullyConnected":
                product_ms[node.node_name] += node.real_time.total_seconds() * 1e3 / runs
    wall_ms = (time.perf_counter() - t0) / runs * 1e3
    runtime_ops = {op.get_friendly_name(): op for op in compiled.get_runtime_model().get_ordered_ops()}
    products = [(name, product_shape(runtime_ops[name]), ms) for name, ms in product_ms.items()]
    return {"wall_ms": wall_ms, "gflop": spec.flops(batch) / 1e9, "ops": per_op, "count": count,
            "products": products}


def print_products(products) -> None:
    """One line per product, slowest first: rows x depth -> columns, time, GFLOP/s."""
    for name, shape, ms in sorted(products, key=lambda p: -p[2]):
        if shape is None:
            print(f"   {ms * 1e3:7.0f} us  {name}: shape unknown")
            continue
        rows, depth, columns = shape
        print(f"   {ms * 1e3:7.0f} us  {rows:5d} x {depth:5d} -> {columns:5d}  "
              f"{2 * rows * depth * columns / ms / 1e6:6.0f} GFLOP/s  {name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("stages", nargs="+")
    parser.add_argument("--precision", default="bf16", choices=["f32", "bf16"])
    parser.add_argument("--batch", type=int, default=2, help="rows per call (2 = one CFG step of one image)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--products", action="store_true",
                        help="list every matrix product (shapes, time, GFLOP/s) instead of the time per node type")
    args = parser.parse_args(argv)
    import openvino

    from keystep.runtime.bundle import Bundle

    from .common import cpu_name

    core, bundle = openvino.Core(), Bundle.load(args.bundle)
    print(f"{cpu_name()}; OpenVINO {openvino.__version__}, {args.precision}, batch {args.batch}, {args.runs} runs")
    for stage in args.stages:
        r = profile_stage(core, bundle.stage(stage), args.precision, args.batch, args.runs)
        total = sum(r["ops"].values())
        print(f"== {stage}: wall {r['wall_ms']:.2f} ms, nodes {total:.2f} ms, {r['gflop']:.2f} GFLOP "
              f"({r['gflop'] / r['wall_ms'] * 1e3:.0f} GFLOP/s, every token counted)")
        if args.products:
            print_products(r["products"])
            continue
        for op, ms in r["ops"].most_common(args.top):
            print(f"   {ms:7.2f} ms {100 * ms / total:5.1f} %  x{r['count'][op]:.0f}  {op}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
