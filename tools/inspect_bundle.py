"""``keystep inspect``: what a bundle holds and what its plan will run."""

from __future__ import annotations

from dataclasses import replace

from keystep.runtime.bundle import Bundle
from keystep.runtime.plan import build_calls, parse_key_steps, plan_flops
from keystep.runtime.sampler import scheduler_for


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
        }

    def flops(stage: str, batch: int):
        return bundle.stage(stage).flops(batch)

    cfg = options.guidance > 1
    _, timesteps = scheduler_for(bundle, options)
    plan = parse_key_steps(options.key_steps, len(timesteps), bundle.family)
    # without a backend to ask, show CPU's default (one decoder call per step) unless --parallel is given
    calls = build_calls(plan, images, cfg, bool(options.parallel), options.max_decoder_batch)
    baseline = build_calls(replace(plan, baseline=True), images, cfg)
    total, base_total = plan_flops(calls, flops), plan_flops(baseline, flops)
    return {
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
            "calls": [
                {"stage": c.stage, "steps": list(c.steps), "batch": c.batch, "flops": flops(c.stage, c.batch)}
                for c in calls
            ],
            "flops": total,
            "baseline_flops": base_total,
            "flop_ratio": (total / base_total) if total and base_total else None,
        },
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
        lines.append("split   encoder = conv_in + down blocks + mid block, decoder = up blocks + output head")
    lines.append(f"sched   {d['scheduler'].get('_class_name')}")
    lines.append("stages")
    for name, s in d["stages"].items():
        ins = ", ".join(f"{i['name']}{list(i['shape'])}" for i in s["inputs"])
        outs = ", ".join(f"{o['name']}{list(o['shape'])}" for o in s["outputs"])
        gf = "?" if s["gflops_per_sample"] is None else f"{s['gflops_per_sample']:.3f}"
        lines.append(f"  {name:<12} {s['bytes'] / 1e6:8.1f} MB  {gf:>9} GFLOP/sample  ({ins}) -> ({outs})")
    p = d["plan"]
    kind = "baseline (full model every step)" if p["baseline"] else f"key steps {p['key_steps']}"
    lines.append(f"plan    {p['spec']}: {p['num_steps']} steps, {p['images']} image(s), CFG {'on' if p['cfg'] else 'off'}")
    lines.append(f"        {kind}")
    lines.append(f"  {'#':>3}  {'stage':<8} {'steps':<10} {'batch':>5}  {'GFLOP':>9}")
    for i, c in enumerate(p["calls"]):
        gf = "?" if c["flops"] is None else f"{c['flops'] / 1e9:.3f}"
        lines.append(f"  {i:>3}  {c['stage']:<8} {_steps(c['steps']):<10} {c['batch']:>5}  {gf:>9}")
    if p["flops"] is not None:
        lines.append(
            f"total   {p['flops'] / 1e9:.2f} GFLOP vs baseline {p['baseline_flops'] / 1e9:.2f} GFLOP "
            f"(ratio {p['flop_ratio']:.3f}, bound {1 / p['flop_ratio']:.2f}x)"
        )
    return "\n".join(lines)
