"""Fine-tune a shipped DiT into a DyDiT at FLOPs target λ, saved in the official DyDiT checkpoint layout.

    python -m keystep.tools.train.dydit --base digits-dit --target 0.5 --out models/digits-dydit-0.5.safetensors \\
        [--iters 3000] [--max-minutes 14] [--resume] [--threads 1]

DyDiT's routers (ICLR 2025, official code): on every block, width routers Linear(hidden -> heads-1) on the timestep
embedding (head / group 0 always on) and a token router MLP on the post-attention stream, initialised to let
everything through (bias 15, token router 35); hard Gumbel-sigmoid (τ = 5) with a straight-through gradient while
training; FLOPs loss 2 (FLOPs ratio − target)², the target warmed up linearly from 1.0 to λ; FLOPs by DyDiT's
accounting (attention ∝ active heads, MLP ∝ active groups × active tokens, per sample, averaged over the batch).

The defaults are the recipe of the shipped digits-dydit models (docs/models.md has the measurements behind it):

* ``--token-skip off``: width only — the token routers are saved never to skip (last layer 0, bias +35; the loader
  leaves such routers out), the FLOPs target is met by the width routers alone. ``on`` trains DyDiT's token skipping.
* ``--width-router-lr`` / ``--token-router-lr`` 1e-3 (see ``Recipe``).
* ``--distill 1``: besides the ε loss (``--noise-weight``), regress the dense model's noise prediction (the teacher is
  ``--base``, frozen) — the usual loss for fine-tuning a pruned / dynamic-width network from its dense parent, far
  less noisy than the ε target. ``--full-weight 0``: no full-width term (DyDiT's stage 2; the official stage 1 has
  weight 1, at the cost of a second forward and backward per iteration).
* ``--warmup`` (default iters/6) iterations of target warm-up; ``--freeze-routers-at N`` (default iters/3): from
  iteration N on the routers and the timestep embedder the width routers read stop learning and the masks are the
  inference masks (logit > 0, no Gumbel noise): the weights then train on exactly what will run.
* ``--ema 0.999``: an EMA of the weights (routers included) is what is saved; it restarts at the router freeze (it
  then averages weights trained with the final masks only). ``--ema 0`` saves the last iterate.

The first shipped recipe is ``--iters 800 --warmup 400 --freeze-routers-at 0 --distill 0 --full-weight 1 --ema 0
--token-skip on --width-router-lr 0.05 --token-router-lr 0.1``. Runs stop after ``--max-minutes`` (state saved next
to ``--out``) and continue with ``--resume`` (``--iters N --resume`` extends a run); see resumable.py.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .resumable import (Budget, StateError, add_resume_arguments, capture_rng, checkpoint_iterations,
                        default_state_path, load_state, restore_rng, run_chunk, save_state)
from .timestep_sampling import linear_alphas_cumprod

GUMBEL_TAU = 5.0
FLOPS_LOSS_WEIGHT = 2.0
WIDTH_ROUTER_BIAS, TOKEN_ROUTER_BIAS = 15.0, 35.0
STATE_KIND = "dydit-finetune"
LOG_EVERY = 50
# a router logit this close to 0 is undecided: the training noise (logistic) flips it with probability > 12 %
UNDECIDED_LOGIT = 2.0


@dataclass
class Recipe:
    """Everything that determines the run (stored in the training state and the saved model's metadata)."""

    base: str
    target: float
    iters: int
    batch: int = 128
    lr: float = 2e-4
    seed: int = 0
    warmup: int = 0  # iterations over which the FLOPs target goes from 1 to λ; 0 = iters // 6
    # Adam moves each router weight by ~lr per step and a router reads a 128-d input (the timestep embedding's L1 norm
    # is 130-415 on digits-dit): a logit moves by up to ~lr x 415 per step. 1e-3 lets the routers leave their all-on
    # initialisation (bias 15 / 35) within a few hundred steps without saturating; the first recipe's 0.05 / 0.1
    # saturated them in the first steps (docs/models.md). Official: 1e-4 over 30k-200k iterations.
    width_router_lr: float = 1e-3
    token_router_lr: float = 1e-3
    noise_weight: float = 1.0
    distill_weight: float = 1.0
    full_weight: float = 0.0
    freeze_routers_at: int | None = None  # None = iters // 3; 0 = never
    ema: float = 0.999  # 0 = save the last iterate
    token_skip: bool = False

    def __post_init__(self):
        self.warmup = self.warmup or max(1, self.iters // 6)
        if self.freeze_routers_at is None:
            self.freeze_routers_at = max(1, self.iters // 3)

    def metadata(self) -> dict:
        return {f"train_{k}": v for k, v in asdict(self).items()}


def gumbel_sigmoid_st(logits, tau: float = GUMBEL_TAU):
    """Hard 0/1 sample of sigmoid((logits + Gumbel noise difference) / tau), straight-through gradient."""
    import torch

    u1, u2 = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6), torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    noise = -torch.log(torch.log(u2) / torch.log(u1))
    soft = torch.sigmoid((logits + noise) / tau)
    hard = (soft > 0.5).to(logits.dtype)
    return hard - soft.detach() + soft


def add_routers(model):
    """Attach DyDiT routers initialised to keep every unit and token on -> WidthRouters."""
    import torch

    from keystep.export.dydit import WidthRouters, token_router

    cfg = model.config
    routers = WidthRouters(cfg.hidden_size, cfg.depth, cfg.num_heads)
    with torch.no_grad():
        for router in [*routers.attn, *routers.mlp]:
            torch.nn.init.normal_(router.weight, std=1e-3)
            router.bias.fill_(WIDTH_ROUTER_BIAS)
        for block in model.blocks:
            block.token_router = token_router(cfg.hidden_size)
            torch.nn.init.normal_(block.token_router[2].weight, std=1e-3)
            block.token_router[2].bias.fill_(TOKEN_ROUTER_BIAS)
    return routers


def dydit_state_dict(model, routers, token_skip: bool = True) -> dict:
    """Original DiT keys + the official router keys. Without token skipping the token routers are written as
    never skipping (last layer: weight 0, bias +35), so the checkpoint stays in the official layout."""
    import torch

    from keystep.export.dit_loaders import original_state_dict

    sd = original_state_dict(model)
    for i, block in enumerate(model.blocks):
        for w in ("weight", "bias"):
            sd[f"blocks.{i}.attn_rate.router.{w}"] = getattr(routers.attn[i], w).detach().clone()
            sd[f"blocks.{i}.mlp_rate.router.{w}"] = getattr(routers.mlp[i], w).detach().clone()
            for j in (0, 2):
                sd[f"blocks.{i}.token_selection.mlp_head.{j}.{w}"] = getattr(block.token_router[j], w).detach().clone()
        if not token_skip:
            sd[f"blocks.{i}.token_selection.mlp_head.2.weight"] = torch.zeros_like(block.token_router[2].weight)
            sd[f"blocks.{i}.token_selection.mlp_head.2.bias"] = torch.full_like(block.token_router[2].bias,
                                                                                 TOKEN_ROUTER_BIAS)
    return sd


class FineTune:
    """One DyDiT fine-tuning run: model, routers, EMA, teacher, optimizer and RNG; ``step`` runs one iteration."""

    def __init__(self, recipe: Recipe):
        import torch

        from keystep.export.dit_loaders import load_dit
        from keystep.runtime.width import UnitFlops

        from .digits import load_digit_images

        self.recipe = r = recipe
        torch.manual_seed(r.seed)
        self.rng = np.random.default_rng(r.seed)
        self.model = load_dit(r.base).model.train()
        cfg = self.model.config
        self.routers = add_routers(self.model).train()
        self.teacher = None
        if r.distill_weight:
            self.teacher = load_dit(r.base).model.eval().requires_grad_(False)
        self.ema = (copy.deepcopy(self.model).eval(), copy.deepcopy(self.routers).eval()) if r.ema else None
        images, labels = load_digit_images()
        self.x0_all, self.y_all = torch.from_numpy(images), torch.from_numpy(labels)
        alphas = linear_alphas_cumprod()
        self.sqrt_a = torch.from_numpy(np.sqrt(alphas)).float()
        self.sqrt_1ma = torch.from_numpy(np.sqrt(1 - alphas)).float()
        self.unit = UnitFlops.of(cfg)
        self.dense = self.unit.dense(cfg.depth, cfg.num_heads)
        self.token_params = [p for b in self.model.blocks for p in b.token_router.parameters()]
        token_ids = {id(p) for p in self.token_params}
        self.dit_params = [p for p in self.model.parameters() if id(p) not in token_ids]
        self.opt = torch.optim.AdamW([
            {"params": self.dit_params, "lr": r.lr},
            {"params": list(self.routers.parameters()), "lr": r.width_router_lr},
            {"params": self.token_params, "lr": r.token_router_lr if r.token_skip else 0.0},
        ], weight_decay=0.0)
        self.iteration, self.seconds, self.history = 0, 0.0, []
        self.checkpoints: tuple[int, ...] = ()  # iterations whose model is saved too (kept across resumes)
        self._window: list = []
        self._last_masks = self.width_masks()
        self.selections: list = []
        for block in self.model.blocks:
            block.token_gate = self._gate

    # -- state -------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "recipe": asdict(self.recipe), "iteration": self.iteration, "seconds": self.seconds,
            "history": self.history, "window": self._window, "last_masks": self._last_masks,
            "checkpoints": list(self.checkpoints),
            "model": self.model.state_dict(), "routers": self.routers.state_dict(),
            "ema": None if self.ema is None else (self.ema[0].state_dict(), self.ema[1].state_dict()),
            "optimizer": self.opt.state_dict(), "rng": capture_rng(self.rng),
        }

    @classmethod
    def resume(cls, state: dict, iters: int | None = None) -> "FineTune":
        recipe = Recipe(**state["recipe"])
        if iters is not None and iters != recipe.iters:
            if iters < state["iteration"]:
                raise StateError(f"--iters {iters} is below the {state['iteration']} iterations already run")
            recipe.iters = iters  # extending a run: warm-up and freeze points stay where they were
        run = cls(recipe)
        run.model.load_state_dict(state["model"])
        run.routers.load_state_dict(state["routers"])
        if run.ema is not None:
            run.ema[0].load_state_dict(state["ema"][0])
            run.ema[1].load_state_dict(state["ema"][1])
        run.opt.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], run.rng)
        run.iteration, run.seconds, run.history = state["iteration"], state["seconds"], state["history"]
        if run.routers_frozen:
            run._stop_router_training()
        run._window, run._last_masks = state["window"], state["last_masks"]
        run.checkpoints = tuple(state.get("checkpoints", ()))
        return run

    # -- training ----------------------------------------------------------------------------------------------
    @property
    def routers_frozen(self) -> bool:
        return bool(self.recipe.freeze_routers_at) and self.iteration >= self.recipe.freeze_routers_at

    def _gate(self, logits):
        """Token selection while training: Gumbel samples while the routers learn, the inference rule after."""
        select = (logits > 0).to(logits.dtype) if self.routers_frozen else gumbel_sigmoid_st(logits)
        self.selections.append((select, logits.detach()))
        return select

    def _width(self, router, t_emb):
        import torch

        logits = router(t_emb)
        on = (logits > 0).to(logits.dtype) if self.routers_frozen else gumbel_sigmoid_st(logits)
        return torch.cat([torch.ones(len(t_emb), 1), on], 1)

    def _regression(self, pred, noise, teacher):
        r = self.recipe
        loss = r.noise_weight * ((pred - noise) ** 2).mean() if r.noise_weight else 0.0
        if teacher is not None:
            loss = loss + r.distill_weight * ((pred - teacher) ** 2).mean()
        return loss

    def step(self) -> None:
        import torch

        from .dit import CLASS_DROPOUT, update_ema

        r, model, cfg = self.recipe, self.model, self.model.config
        self.iteration = it = self.iteration + 1
        if self.routers_frozen and it == r.freeze_routers_at:
            self._stop_router_training()
            self._restart_ema()
        idx = torch.from_numpy(self.rng.integers(0, len(self.x0_all), r.batch))
        x0, y = self.x0_all[idx], self.y_all[idx].clone()
        y[torch.from_numpy(self.rng.random(r.batch) < CLASS_DROPOUT)] = cfg.num_classes
        t = torch.from_numpy(self.rng.integers(0, 1000, r.batch))
        noise = torch.randn_like(x0)
        xt = self.sqrt_a[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1ma[t].view(-1, 1, 1, 1) * noise
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(xt, t.float(), y)
        c = model.condition(t.float(), y)
        t_emb = model.timestep_embedding(t.float())
        heads = [self._width(router, t_emb) for router in self.routers.attn]
        groups = [self._width(router, t_emb) for router in self.routers.mlp]
        self.selections.clear()
        for block in model.blocks:
            block.token_mode = "dense" if r.token_skip else "off"
        hidden, _ = model.run_blocks(model.embed(xt), c, 0, cfg.depth, torch.cat(heads, 1), torch.cat(groups, 1))
        dynamic_pred = model.head(hidden, c)
        loss = self._regression(dynamic_pred, noise, teacher)
        full_loss = torch.zeros(())
        if r.full_weight:
            for block in model.blocks:
                block.token_mode = "off"
            full_loss = self._regression(model(xt, t.float(), y), noise, teacher)
            loss = loss + r.full_weight * full_loss
        # DyDiT FLOPs accounting per sample, then the batch mean
        token_frac = (torch.stack([s.mean(dim=(1, 2)) for s, _ in self.selections], 1) if self.selections
                      else torch.ones(r.batch, cfg.depth))  # (batch, depth)
        per_block = (torch.stack(heads, 1).sum(-1) * self.unit.head
                     + torch.stack(groups, 1).sum(-1) * self.unit.group_per_token * self.unit.tokens * token_frac)
        ratio = (per_block.sum(1) / self.dense).mean()
        target = self.flops_target(it)
        if not self.routers_frozen:
            loss = loss + FLOPS_LOSS_WEIGHT * (ratio - target) ** 2
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*self.dit_params, *self.routers.parameters(), *self.token_params], 1.0)
        self.opt.step()
        if self.ema is not None:
            since = it - r.freeze_routers_at if self.routers_frozen else it  # the EMA's warm-up restarts at the freeze
            update_ema(self.ema[0], model, since, r.ema)
            update_ema(self.ema[1], self.routers, since, r.ema)
        with torch.no_grad():
            token_logits = torch.cat([logits.flatten() for _, logits in self.selections] or [torch.full((1,), 1e9)])
            self._window.append([float(((dynamic_pred - noise) ** 2).mean()),
                                 float(((dynamic_pred - teacher) ** 2).mean()) if teacher is not None else float("nan"),
                                 float(full_loss), float(ratio),
                                 float((token_logits.abs() < UNDECIDED_LOGIT).float().mean()),
                                 float((token_logits > 0).float().mean())])
        if it % LOG_EVERY == 0 or it == r.iters:
            self._log(target)

    def flops_target(self, it: int) -> float:
        r = self.recipe
        return 1.0 - (1.0 - r.target) * min(1.0, it / r.warmup)

    def _stop_router_training(self) -> None:
        """The routers and the timestep embedder they read stop learning: the width masks are fixed from here on."""
        for group in self.opt.param_groups[1:]:
            group["lr"] = 0.0
        self.routers.requires_grad_(False)
        for p in [*self.token_params, *self.model.t_fc1.parameters(), *self.model.t_fc2.parameters()]:
            p.requires_grad_(False)

    def _restart_ema(self) -> None:
        """At the freeze the EMA starts over from the current weights and routers: what is saved then averages only
        weights trained with the final masks, and has exactly those masks."""
        if self.ema is not None:
            self.ema[0].load_state_dict(self.model.state_dict())
            self.ema[1].load_state_dict(self.routers.state_dict())

    def width_masks(self, routers=None) -> np.ndarray:
        """Inference width masks (1000 timesteps, depth, 2, heads) of ``routers`` (default: the trained ones)."""
        return (routers or self.routers).masks(self.model, np.arange(1000))

    def width_logits(self):
        import torch

        with torch.no_grad():
            t_emb = self.model.timestep_embedding(torch.arange(1000).float())
            return torch.cat([router(t_emb) for router in [*self.routers.attn, *self.routers.mlp]], 1)

    def _log(self, target: float) -> None:
        masks = self.width_masks()
        logits = self.width_logits()
        dyn, distill, full, ratio, tok_undecided, tok_kept = np.mean(self._window, axis=0)
        entry = {
            "iteration": self.iteration, "dynamic_mse": dyn, "teacher_mse": distill, "full_loss": full,
            "flops_ratio": ratio, "flops_target": target,
            "width_on": float(masks.mean()),  # incl. the always-on unit 0
            "width_undecided": float((logits.abs() < UNDECIDED_LOGIT).float().mean()),
            "width_logit_median": float(logits.abs().median()),
            "width_flips": int((masks != self._last_masks).sum()),
            "token_undecided": tok_undecided, "token_kept": tok_kept,
        }
        self.history.append({k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in entry.items()})
        self._window, self._last_masks = [], masks

    def save(self, path: Path, extra: dict | None = None) -> None:
        from .dit import save_checkpoint

        model, routers = (self.ema if self.ema is not None else (self.model, self.routers))
        last = self.history[-1] if self.history else {}
        metadata = {"num_heads": self.model.config.num_heads, **self.recipe.metadata(),
                    "train_iterations_run": self.iteration, "train_seconds": round(self.seconds),
                    "train_final": json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()}),
                    # the keys of the first shipped checkpoints, kept for readers of those
                    "target": self.recipe.target, "iters": self.iteration, "base": self.recipe.base, **(extra or {})}
        save_checkpoint(dydit_state_dict(model, routers, self.recipe.token_skip), path, metadata)


def format_log(entry: dict, iters: int, seconds: float) -> str:
    distill = "" if np.isnan(entry["teacher_mse"]) else f"  vs teacher {entry['teacher_mse']:.4f}"
    return (f"iter {entry['iteration']}/{iters}  dynamic {entry['dynamic_mse']:.4f}{distill}  full {entry['full_loss']:.4f}  "
            f"FLOPs ratio {entry['flops_ratio']:.3f} (target {entry['flops_target']:.3f})  width on "
            f"{entry['width_on']:.3f} |logit| {entry['width_logit_median']:.1f} undecided {entry['width_undecided']:.3f} "
            f"flips {entry['width_flips']}  tokens kept "
            f"{entry['token_kept']:.3f} undecided {entry['token_undecided']:.3f}  {seconds:.0f} s")


def run(recipe: Recipe | None, out: Path, state_path: Path | None = None, resume: bool = False,
        max_minutes: float | None = None, iters: int | None = None, checkpoints: tuple[int, ...] = (),
        chunk_iters: int | None = None, progress=print) -> dict:
    """Train (or continue) until ``recipe.iters``, the time budget or ``chunk_iters`` more iterations;
    -> {"done", "iteration", "seconds", "state", "final"}. The model is written to ``out`` when the run completes;
    the state file is kept (a run extended with a larger ``iters`` resumes from it)."""
    state_path = state_path or default_state_path(out)
    budget = Budget(max_minutes)
    run = FineTune.resume(load_state(state_path, STATE_KIND), iters) if resume else FineTune(recipe)
    run.checkpoints = tuple(sorted({*run.checkpoints, *checkpoints}))
    total = run.recipe.iters
    start_seconds, stop = run.seconds, total if chunk_iters is None else min(total, run.iteration + chunk_iters)
    while run.iteration < stop:
        run.step()
        run.seconds = start_seconds + budget.elapsed()
        if run.iteration % LOG_EVERY == 0 or run.iteration == total:
            progress(format_log(run.history[-1], total, run.seconds))
        if run.iteration in run.checkpoints:
            run.save(out.with_name(f"{out.stem}-{run.iteration}{out.suffix}"))
        if budget.expired():
            break
    save_state(state_path, STATE_KIND, run.state())
    done = run.iteration >= total
    if done:
        run.save(out)
    return {"done": done, "iteration": run.iteration, "seconds": run.seconds, "state": str(state_path),
            "final": run.history[-1] if run.history else {}}


def train(base: str, target: float, out: Path, iters: int, batch: int = 128, lr: float = 2e-4, seed: int = 0,
          warmup: int | None = None, progress=print, **recipe) -> dict:
    """One uninterrupted run (the original entry point)."""
    r = run(Recipe(base, target, iters, batch, lr, seed, warmup or 0, **recipe), out, progress=progress)
    final = r["final"]
    return {"seconds": r["seconds"], "final": [final["dynamic_mse"], final["full_loss"], final["flops_ratio"]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="digits-dit", help="the DiT to fine-tune (a shipped name or checkpoint)")
    parser.add_argument("--target", type=float, help="FLOPs target λ, e.g. 0.5 (required unless --resume)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, help="total iterations (default 3000; with --resume: extend the run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=0, help="FLOPs-target warm-up iterations (default iters/6)")
    parser.add_argument("--distill", type=float, default=Recipe.distill_weight,
                        help="weight of the dense teacher's noise prediction (0: no teacher)")
    parser.add_argument("--noise-weight", type=float, default=Recipe.noise_weight, help="weight of the ε (noise) loss")
    parser.add_argument("--full-weight", type=float, default=Recipe.full_weight,
                        help="weight of the full-width model's loss (the official stage 1: 1)")
    parser.add_argument("--width-router-lr", type=float, default=Recipe.width_router_lr)
    parser.add_argument("--token-router-lr", type=float, default=Recipe.token_router_lr)
    parser.add_argument("--freeze-routers-at", type=int,
                        help="iteration from which the routers are fixed (default iters/3; 0: never)")
    parser.add_argument("--ema", type=float, default=Recipe.ema, help="EMA decay of the saved weights (0: last iterate)")
    parser.add_argument("--token-skip", choices=["on", "off"], default="off",
                        help="train token routers (DyDiT's spatial token skipping; default off: width only)")
    add_resume_arguments(parser, checkpoints_help="also save the model at these iterations (comma list; kept across "
                                                  "--resume)")
    parser.add_argument("--chunk-iters", type=int, help="stop after this many iterations, state saved")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoints = checkpoint_iterations(parser, args.checkpoints)
    recipe = None
    if not args.resume:
        if args.target is None or not 0 < args.target <= 1:
            parser.error("--target λ in (0, 1] is required for a new run (e.g. --target 0.5)")
        recipe = Recipe(args.base, args.target, args.iters or 3000, args.batch, args.lr, args.seed, args.warmup,
                        width_router_lr=args.width_router_lr, token_router_lr=args.token_router_lr,
                        noise_weight=args.noise_weight, distill_weight=args.distill, full_weight=args.full_weight,
                        freeze_routers_at=args.freeze_routers_at, ema=args.ema, token_skip=args.token_skip == "on")
    out = Path(args.out)
    r = run_chunk(lambda: run(recipe, out, Path(args.state) if args.state else None, args.resume, args.max_minutes,
                              args.iters, checkpoints, args.chunk_iters), "keystep.tools.train.dydit", args.out)
    if isinstance(r, int):
        return r
    f = r["final"]
    print(f"trained in {r['seconds']:.0f} s; last {LOG_EVERY} iters: dynamic {f['dynamic_mse']:.4f}, full "
          f"{f['full_loss']:.4f}, FLOPs ratio {f['flops_ratio']:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
