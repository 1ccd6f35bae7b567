"""``keystep inspect``: what a bundle holds and what its plan will run."""

from __future__ import annotations

from keystep.runtime.bundle import Bundle
from keystep.runtime.engine_plan import EngineIndex, EnginePlanError, buffer_plan, call_shapes, free_axes
from keystep.runtime.plan import plan_flops
from keystep.runtime.sampler import prepare_run
from keystep.runtime.width import UnitFlops


def describe_bundle(bundle: Bundle, options, images: int = 1) -> dict:
    stages = {}
    for name, entry in bundle.manifest["stages"].items():
        spec = bundle.stage(name)
        stages[name] = {
            "files": entry["files"],
            "bytes": sum(f.get("bytes", 0) for f in entry["files"]),
            "inputs": entry["inputs"],
            "outputs": entry["outputs"],
            "gflops_per_sample": None if spec.flops_per_sample is None else spec.flops_per_sample / 1e9,
            "precision": entry.get("precision"),  # absent: an fp32 graph
        }

    def flops(stage: str, batch: int):
        return bundle.stage(stage).flops(batch)

    cfg = options.guidance > 1
    full = "full" in bundle.stages
    # without a backend to ask, show CPU's default (one decoder call per step) unless --parallel is given
    prepared = prepare_run(bundle, options, images, bool(options.parallel), full)
    plan, calls = prepared.plan, prepared.calls
    baseline = prepare_run(bundle, options.with_plan("all"), images, False, full).calls
    total, base_total = plan_flops(calls, flops), plan_flops(baseline, flops)
    description = {
        "bundle": str(bundle.root),
        "family": bundle.family,
        "source": bundle.manifest.get("source"),
        "model_config": bundle.model_config,
        "split": bundle.manifest.get("split"),
        "scheduler": bundle.scheduler_config,
        "stages": stages,
        "plan": {
            "spec": plan.spec,
            "baseline": plan.baseline,
            "num_steps": plan.num_steps,
            "images": images,
            "cfg": cfg,
            "key_steps": list(plan.key_steps),
            "cache": None if prepared.cache is None else {
                "spec": prepared.cache.spec, "variant": prepared.cache.variant, "start": prepared.cache.start,
                "full_steps": list(prepared.cache.full_steps)},
            "calls": [
                {"stage": c.runner, "steps": list(c.steps), "batch": c.batch, "flops": flops(c.runner, c.batch)}
                for c in calls
            ],
            "flops": total,
            "baseline_flops": base_total,
            "flop_ratio": (total / base_total) if total and base_total else None,
        },
    }
    if bundle.width is not None:
        description["width"] = describe_width(bundle, prepared)
    if bundle.cache_variants:
        description["cache_variants"] = bundle.cache_variants
    if "tuned" in bundle.manifest:
        description["tuned"] = bundle.manifest["tuned"]
    description["gpu"] = describe_gpu(bundle, options, images)
    return description


def describe_gpu(bundle: Bundle, options, images: int) -> dict:
    """What the plan costs a GPU backend: one CUDA graph and one set of I/O buffers per distinct call (decoders
    batched per group, as GPU backends run them), and the bundle's TensorRT engines if built."""
    calls = call_shapes(prepare_run(bundle, options, images, True, "full" in bundle.stages).calls)
    index, index_error = None, None
    if EngineIndex.path(bundle.root).is_file():
        try:
            index = EngineIndex.load(bundle.root)
        except EnginePlanError as exc:  # shown, not fatal: inspect is how one finds out what is wrong
            index_error = str(exc)
    axes = index.axes if index else _axes_without_engines(bundle)
    try:
        buffers = None if axes is None else sum(b.bytes for b in buffer_plan(bundle, calls, axes))
    except EnginePlanError:
        buffers = None
    return {
        "cuda_graphs": len(calls),
        "calls": [f"{c.runner}@{c.batch}" for c in calls],
        "io_buffer_bytes": buffers,
        "engines": {"error": index_error} if index_error else None if index is None else {
            "tensorrt": index.tensorrt_version, "gpu": index.gpu, "targets": index.targets,
            "stages": {k: {"file": e.file, "min": e.profile["min"], "opt": e.profile["opt"], "max": e.profile["max"]}
                       for k, e in index.engines.items()}},
    }


def _axes_without_engines(bundle: Bundle) -> dict | None:
    """Non-batch axis sizes by shape inference (needs onnx); None where that is not installed."""
    if not free_axes(bundle):
        return {}
    try:
        from keystep.graphs.trt_build import bundle_axes
    except ImportError:
        return None
    return bundle_axes(bundle)


def describe_width(bundle: Bundle, prepared) -> dict:
    """Profiles, the steps each serves in this run, and per-step block FLOPs (DyDiT's accounting) vs dense."""
    section, width = bundle.manifest["width"], bundle.width
    unit = UnitFlops(**section["unit_flops"])
    dense = unit.dense(bundle.model_config["depth"], bundle.model_config["num_heads"])
    block_flops = unit.of_masks(prepared.step_masks)
    assigned = width.assign(prepared.timesteps)
    engines = []
    for engine in width.engines:
        steps = [i for i, e in enumerate(assigned[engine.stage]) if e.name == engine.name]
        engines.append({"name": engine.name, "masked": engine.masked, "steps": steps,
                        "gflops_per_sample": bundle.stage(engine.name).flops(1) / 1e9})
    return {
        "spec": section["spec"],
        "token_selection": section["token_selection"],
        "approximation": section["approximation"],
        "engines": engines,
        "steps": [
            {"step": i, "timestep": float(t), "encoder": assigned["encoder"][i].name,
             "decoder": assigned["decoder"][i].name, "block_flops_fraction": float(f / dense)}
            for i, (t, f) in enumerate(zip(prepared.timesteps, block_flops))
        ],
        "block_flops_fraction": float(block_flops.mean() / dense),
    }


def _steps(steps: list[int]) -> str:
    return str(steps[0]) if len(steps) == 1 else f"{steps[0]}..{steps[-1]}"


def format_description(d: dict) -> str:
    lines = [f"bundle  {d['bundle']}", f"family  {d['family']}  (source: {(d['source'] or {}).get('kind')})"]
    cfg = d["model_config"]
    lines.append("model   " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    if d["split"] is not None:
        lines.append(f"split   encoder = blocks[:{d['split']}], decoder = blocks[{d['split']}:]")
    else:
        temporal = " + transformer_in" if d["family"] == "unet3d" else ""
        lines.append(f"split   encoder = conv_in{temporal} + down blocks + mid block, decoder = up blocks + output head")
    lines.append(f"sched   {d['scheduler'].get('_class_name')}")
    lines.append("stages")
    for name, s in d["stages"].items():
        ins = ", ".join(f"{i['name']}{list(i['shape'])}" for i in s["inputs"])
        outs = ", ".join(f"{o['name']}{list(o['shape'])}" for o in s["outputs"])
        gf = "?" if s["gflops_per_sample"] is None else f"{s['gflops_per_sample']:.3f}"
        lines.append(f"  {name:<12} {s['bytes'] / 1e6:8.1f} MB  {gf:>9} GFLOP/sample  ({ins}) -> ({outs})")
        if s.get("precision"):
            lines.append(format_precision(s["precision"]))
    p = d["plan"]
    kind = "baseline (full model every step)" if p["baseline"] else f"key steps {p['key_steps']}"
    cache = p["cache"]
    if cache is not None:
        kind = (f"{kind} before step {cache['start']}, then " if cache["start"] else "") + (
            f"cache {cache['variant']}: full steps {cache['full_steps']}, cached stage at the others")
    lines.append(f"plan    {p['spec']}{'+' + cache['spec'] if cache else ''}: {p['num_steps']} steps, "
                 f"{p['images']} image(s), CFG {'on' if p['cfg'] else 'off'}")
    lines.append(f"        {kind}")
    lines.append(f"  {'#':>3}  {'stage':<12} {'steps':<10} {'batch':>5}  {'GFLOP':>9}")
    for i, c in enumerate(p["calls"]):
        gf = "?" if c["flops"] is None else f"{c['flops'] / 1e9:.3f}"
        lines.append(f"  {i:>3}  {c['stage']:<12} {_steps(c['steps']):<10} {c['batch']:>5}  {gf:>9}")
    if p["flops"] is not None:
        lines.append(
            f"total   {p['flops'] / 1e9:.2f} GFLOP vs baseline {p['baseline_flops'] / 1e9:.2f} GFLOP "
            f"(ratio {p['flop_ratio']:.3f}, bound {1 / p['flop_ratio']:.2f}x)"
        )
    if "width" in d:
        lines += format_width(d["width"])
    for name, v in d.get("cache_variants", {}).items():
        what = (f"DeepCache branch {v['branch_id']} (block {v['block']}, layer {v['layer']})"
                if v["kind"] == "deepcache" else f"blocks {v['first']}..{v['last']} skipped, cached residual added")
        lines.append(f"cache   {name}: {what}")
    if "tuned" in d:
        lines += format_tuned(d["tuned"])
    lines += format_gpu(d["gpu"])
    return "\n".join(lines)


def format_gpu(g: dict) -> list[str]:
    buffers = "?" if g["io_buffer_bytes"] is None else f"{g['io_buffer_bytes'] / 2**20:.1f} MiB"
    lines = [f"gpu     {g['cuda_graphs']} CUDA graphs (one per distinct call, decoders batched): "
             f"{', '.join(g['calls'])}; I/O buffers {buffers}"]
    engines = g["engines"]
    if engines is None:
        lines.append("        no TensorRT engines built (keystep engines BUNDLE, on the GPU machine)")
        return lines
    if "error" in engines:
        lines.append(f"        TensorRT engine index unusable: {engines['error']}")
        return lines
    lines.append(f"        TensorRT {engines['tensorrt']} engines for {engines['gpu']}:")
    for name, e in engines["stages"].items():
        lines.append(f"          {name:<12} batch {e['min']}..{e['max']} (opt {e['opt']})  {e['file']}")
    return lines


def format_precision(p: dict) -> str:
    """One stage's precision and its error vs the fp32 graph (the worst output)."""
    errors = p["error_vs_fp32"]["outputs"].values()
    compute = (f"; {p['fp32_compute_nodes']} nodes compute fp32 on {p['type']} tensors "
               f"({', '.join(p['fp32_compute_ops'])})" if p["fp32_compute_nodes"] else "")
    return (f"  {'':<12} {p['type']}: fp32 islands {p['fp32_nodes']} nodes ({', '.join(p['fp32_ops'])}){compute}; "
            f"vs fp32 on {p['error_vs_fp32']['measured_on']}: rel L2 {max(e['rel_l2'] for e in errors):.2e}, "
            f"max abs {max(e['max_abs'] for e in errors):.2e}")


def format_tuned(t: dict) -> list[str]:
    """How ``keystep tune`` chose the default plan."""
    budget = t["budget_flops"] / t["baseline_flops"]
    measured = sum(x["psnr"] is not None for x in t["trials"])
    chosen = next(x for x in t["trials"] if x["plan"] == t["chosen"])
    return [f"tuned   {t['chosen']} by keystep tune --method {t['method']} (budget {budget:.3f} of baseline FLOPs"
            + (f", measured speedup >= {t['target_speedup']}" if t["by"] == "time" else "") + "):",
            f"        {len(t['trials'])} plans considered, {measured} within budget measured on "
            f"{t['calibration']['seeds']} seed(s); chosen: FLOP ratio {chosen['flops_ratio']:.3f}, "
            f"PSNR {chosen['psnr']:.2f} dB vs baseline, {chosen['speedup']:.2f}x measured"]


TOKEN_SELECTION = {
    "gather": "on (MLP on selected tokens only; FLOPs above count every token, an upper bound)",
    "dense": "on (dense 0/1 token masking: every token computes its MLP)",
    "off": "OFF: the checkpoint's token routers are dropped -- an APPROXIMATION of the model",
    "none": "none (the model has no token routers)",
}


def format_width(w: dict) -> list[str]:
    lines = [f"width   {w['spec']}: blocks at {w['block_flops_fraction']:.3f} of dense FLOPs (DyDiT accounting, "
             f"mean over steps); token selection {TOKEN_SELECTION[w['token_selection']]}",
             f"  {'profile':<12} {'kind':<7} {'GFLOP/sample':>12}  steps"]
    for e in w["engines"]:
        kind = "merged" if e["masked"] else "exact"
        lines.append(f"  {e['name']:<12} {kind:<7} {e['gflops_per_sample']:>12.3f}  {e['steps'] or '-'}")
    lines.append(f"  {'step':>4} {'t':>7}  {'encoder':<12} {'decoder':<12} {'blocks vs dense':>15}")
    for s in w["steps"]:
        lines.append(f"  {s['step']:>4} {s['timestep']:>7.1f}  {s['encoder']:<12} {s['decoder']:<12} "
                     f"{s['block_flops_fraction']:>15.3f}")
    return lines
