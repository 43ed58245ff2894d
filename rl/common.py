"""What every trainer shares, written once: the run context, prompt batches, held-out evaluation, value/reward
of rollouts, non-finite guards, and checkpoint save/restore of the trained state."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from policies import lora
from policies.flow import FlowPolicy
from rl import checkpoint as ckpt
from rl.config import option
from rl.metrics import MetricLogger, Timer


@dataclass
class RunConfig:
    """Run-level settings shared by every algorithm."""

    output_dir: str = option("runs/default", help="run directory: checkpoints, metrics.jsonl, tensorboard, export")
    seed: int = option(0, help="global seed (python, numpy, torch); rollouts are deterministic given it on CPU")
    max_epochs: int = option(50, help="number of epochs (sample -> score -> optimise rounds)")
    max_minutes: float | None = option(None, help="stop after this much wall-clock (checkpointing first)")
    ckpt_every: int = option(10, help="checkpoint every N epochs (and always at the end / on SIGTERM)")
    keep_checkpoints: int = option(3, help="how many checkpoints to keep")
    eval_every: int = option(5, help="held-out evaluation every N epochs (0 = only at start and end)")
    log_backends: tuple[str, ...] = option(("tensorboard",), help="any of tensorboard, wandb")
    wandb_project: str | None = option(None, help="wandb project (with the wandb backend)")
    mixed_precision: str = option("no", help="accelerate mixed precision: no, bf16, fp16")
    max_nonfinite: int = option(5, help="stop after this many consecutive skipped (non-finite) updates")
    export_lora: bool = option(True, help="export the trained LoRA in diffusers format at the end")


@dataclass
class EvalConfig:
    """Held-out evaluation: sample the eval prompts with the current policy and score them."""

    num_steps: int = option(20, help="Euler steps of the evaluation sampler")
    guidance_scale: float = option(1.0, help="CFG weight at evaluation")
    batch_size: int = option(32, help="evaluation batch size")
    seed: int = option(1234, help="noise seed: the same z_T for every evaluation, so curves compare like with like")
    num_images_logged: int = option(16, help="samples in the logged image grid")


@dataclass
class Run:
    """The built objects a trainer works with (made by rl/train.py)."""

    policy: FlowPolicy
    critic: Any
    train_prompts: list[str]
    eval_prompts: list[str]
    eval_metric: Callable[[Tensor, list[str]], Any] | None
    accelerator: Any
    logger: MetricLogger
    run_cfg: RunConfig
    eval_cfg: EvalConfig
    config_dict: dict = field(default_factory=dict)
    reward: Any = None  # the pixel reward r(images, prompts) of finished samples (trainers that need R besides V)
    cotrain: Any = None  # rl.cotrain.CotrainConfig from critic.cotrain (None: off)
    timer: Timer = field(default_factory=Timer)
    start_time: float = field(default_factory=time.time)

    @property
    def run_dir(self) -> Path:
        return Path(self.run_cfg.output_dir)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def out_of_time(self) -> bool:
        limit = self.run_cfg.max_minutes
        return limit is not None and (time.time() - self.start_time) / 60 >= limit


def setup_lora(run: "Run", spec: lora.LoraSpec, lr: float, weight_decay: float,
               adapters: tuple[str, ...] = ("default",)) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    """Add the LoRA adapters, make only adapter "default" trainable, build AdamW and route through accelerate.

    Returns (trained parameters, optimizer)."""
    policy, accel = run.policy, run.accelerator
    transformer = policy.transformer
    for name in adapters:
        lora.add_lora(transformer, spec, name)
    for name in adapters[1:]:
        lora.copy_adapter(transformer, "default", name)
    lora.set_active(transformer, "default")
    transformer.requires_grad_(False)
    params = list(lora.adapter_parameters(transformer, "default").values())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    wrapped, optimizer = accel.prepare(transformer, optimizer)
    policy.set_forward_module(wrapped)
    return params, optimizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prompt_batch(prompts: list[str], num_prompts: int, epoch: int, seed: int) -> list[str]:
    """The epoch's prompts: a deterministic function of (seed, epoch), so a resumed run draws the same ones."""
    rng = np.random.default_rng([seed, epoch])
    return [prompts[i] for i in rng.choice(len(prompts), size=num_prompts, replace=len(prompts) < num_prompts)]


def metric_scores(metric: Callable, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
    """Normalise a metric's output: a Tensor (B,) or an object/dict of per-criterion tensors."""
    out = metric(images, prompts)
    if isinstance(out, Tensor):
        return {"score": out.float()}
    if isinstance(out, dict):
        return {k: v.float() for k, v in out.items()}
    # per-criterion scores only (a result may also carry masks, e.g. ShapesEval's has_relation)
    return {k: v.float() for k, v in vars(out).items() if isinstance(v, Tensor) and v.is_floating_point()}


@torch.no_grad()
def evaluate(run: Run, adapter: str | None = "default") -> tuple[dict[str, float], Tensor]:
    """Held-out score of the policy (ODE sampler, fixed noise). Returns (metrics, first images (N,3,H,W))."""
    policy, cfg = run.policy, run.eval_cfg
    if run.eval_metric is None or not run.eval_prompts:
        return {}, torch.empty(0)
    generator = torch.Generator(run.device).manual_seed(cfg.seed)
    totals: dict[str, list[Tensor]] = {}
    first = None
    for start in range(0, len(run.eval_prompts), cfg.batch_size):
        prompts = run.eval_prompts[start:start + cfg.batch_size]
        z_T = policy.noise(len(prompts), generator)
        if adapter is None:
            with lora.reference_policy(policy.transformer):
                traj = policy.sample(prompts, cfg.num_steps, cfg.guidance_scale, z_T=z_T, keep_latents=False)
        else:
            with lora.using_adapter(policy.transformer, adapter):
                traj = policy.sample(prompts, cfg.num_steps, cfg.guidance_scale, z_T=z_T, keep_latents=False)
        images = policy.decode(traj.z_tau)
        for k, v in metric_scores(run.eval_metric, images, prompts).items():
            totals.setdefault(k, []).append(v.cpu())
        if first is None:
            first = images[: cfg.num_images_logged].cpu()
    from torchvision.utils import make_grid

    grid = make_grid(first, nrow=max(1, int(math.sqrt(len(first)))), padding=1)  # (3, H', W')
    return {f"eval/{k}": torch.cat(v).mean().item() for k, v in totals.items()}, grid


def all_finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def clipped_step(accelerator, optimizer, params: list[nn.Parameter], max_grad_norm: float,
                 loss_finite: bool = True) -> tuple[float, bool]:
    """Clip gradients and step, unless the loss or the gradient norm is non-finite: then the gradients are dropped
    so a non-finite update never reaches the weights. Returns (grad norm, stepped)."""
    norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    norm = float(norm) if norm is not None else grad_norm(params)
    if not (loss_finite and math.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        return norm, False
    optimizer.step()
    return norm, True


def grad_norm(params: list[nn.Parameter]) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


# ---------------------------------------------------------------------------------------------- checkpoints
def trained_state(run: Run, optimizer: torch.optim.Optimizer, adapters: tuple[str, ...]) -> tuple[dict, dict]:
    """(tensor groups, JSON state) of everything needed to resume: LoRA adapters and the optimizer."""
    transformer = run.policy.transformer
    tensors = {f"lora_{name}": lora.adapter_state_dict(transformer, name) for name in adapters}
    opt_tensors, opt_meta = ckpt.optimizer_state_to_tensors(optimizer.state_dict())
    tensors["optimizer"] = opt_tensors
    return tensors, {"optimizer": opt_meta}


def save(run: Run, epoch: int, optimizer, adapters: tuple[str, ...], extra: dict | None = None,
         extra_tensors: dict[str, dict[str, Tensor]] | None = None) -> Path | None:
    """Checkpoint after ``epoch`` completed epochs (main process only; others wait). ``extra`` is JSON state,
    ``extra_tensors`` more tensor groups (e.g. a co-trained critic and its optimizer)."""
    run.accelerator.wait_for_everyone()
    path = None
    if run.accelerator.is_main_process:
        tensors, state = trained_state(run, optimizer, adapters)
        tensors.update(extra_tensors or {})
        state.update(config=run.config_dict, **(extra or {}))
        path = ckpt.save_checkpoint(run.run_dir, epoch, tensors, state, keep=run.run_cfg.keep_checkpoints)
    run.accelerator.wait_for_everyone()
    return path


def restore(run: Run, source: str, optimizer, adapters: tuple[str, ...]) -> tuple[int, dict]:
    """Load a checkpoint ('latest', a run dir or a step dir) into the policy and optimizer; returns (epoch, state)."""
    source = str(run.run_dir) if source == "latest" else source
    loaded = ckpt.load_checkpoint(source)
    transformer = run.policy.transformer
    for name in adapters:
        lora.load_adapter_state_dict(transformer, {k: v.to(run.device) for k, v in loaded.tensors[f"lora_{name}"].items()},
                                     name)
    optimizer.load_state_dict(ckpt.optimizer_state_from_tensors(loaded.tensors["optimizer"], loaded.state["optimizer"]))
    ckpt.restore_rng(loaded.state["rng"])
    return loaded.step, loaded.state


def finish(run: Run, adapter: str = "default") -> Path | None:
    """Export the trained adapter in diffusers format to ``run_dir/lora`` (main process)."""
    run.accelerator.wait_for_everyone()
    if not (run.run_cfg.export_lora and run.accelerator.is_main_process):
        return None
    transformer = run.policy.transformer
    return lora.export_diffusers(transformer, run.run_dir / "lora", adapter)


def log_mean_std(prefix: str, x: Tensor) -> dict[str, float]:
    x = x.float()
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return {f"{prefix}/mean": math.nan, f"{prefix}/std": math.nan}
    return {f"{prefix}/mean": finite.mean().item(), f"{prefix}/std": finite.std().item() if finite.numel() > 1 else 0.0}
