"""What every trainer shares, written once: the run context, prompt batches, held-out evaluation, value/reward
of rollouts, non-finite guards, and checkpoint save/restore of the trained state. Everything here runs the same
on one process, under DDP and under DeepSpeed ZeRO-2/3 (the backend-specific parts are in rl/distributed.py)."""

from __future__ import annotations

import json
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
from rl import distributed
from rl.config import ConfigError, check, option, to_yaml
from rl.metrics import BACKENDS, MetricLogger, Timer

MIXED_PRECISION = ("no", "bf16", "fp16")
MATMUL_PRECISION = ("highest", "high", "medium")  # torch.set_float32_matmul_precision
MAX_SEED = 2**63  # torch.manual_seed takes < 2**64; room for seed + process index


@dataclass
class RunConfig:
    """Run-level settings shared by every algorithm."""

    output_dir: str = option("runs/default", help="run directory: checkpoints, metrics.jsonl, tensorboard, export")
    overwrite: bool = option(False, help="a new run into an output_dir that holds another run replaces it (its "
                                         "metrics, checkpoints, images and export are deleted); without it that is "
                                         "an error (--resume latest continues the run there)")
    seed: int = option(0, help="global seed (python, numpy, torch); rollouts are deterministic given it on CPU")
    max_epochs: int = option(50, help="number of epochs (sample -> score -> optimise rounds)")
    max_minutes: float | None = option(None, help="stop after this much wall-clock (checkpointing first)")
    ckpt_every: int = option(10, help="checkpoint every N epochs (and always at the end / on SIGTERM)")
    keep_checkpoints: int = option(3, help="how many checkpoints to keep")
    eval_every: int = option(5, help="held-out evaluation every N epochs (0 = only at start and end)")
    log_backends: tuple[str, ...] = option(("tensorboard",), help="any of tensorboard, wandb")
    wandb_project: str | None = option(None, help="wandb project (with the wandb backend)")
    mixed_precision: str = option("no", help="accelerate mixed precision: no, bf16, fp16")
    matmul_precision: str = option(
        "highest", help="float32 matmuls (torch.set_float32_matmul_precision): highest = full fp32; high = TF32 on "
                        "Ampere and later GPUs (tensor cores, 10-bit mantissa); medium = bf16. CPU matmuls are "
                        "unaffected")
    cuda_graphs: bool = option(
        False, help="replay the policy's forwards without autograd (rollouts, evaluation, the KL reference) as CUDA "
                    "graphs (FlowPolicy.enable_cuda_graphs): faster where small batches leave the GPU waiting on kernel "
                    "launches (DRaFT's 64-sample Shapes rollouts: 2.6x on an H100). CUDA only, not with ZeRO-3; the "
                    "samples are the same")
    gradient_accumulation_steps: int = option(
        1, help="micro-batches per optimizer step on each process (a memory knob: batch sizes are global, so the "
                "update is the same whatever this and the number of processes)")
    max_nonfinite: int = option(5, help="stop after this many consecutive skipped (non-finite) updates")
    export_lora: bool = option(True, help="export the trained LoRA in diffusers format at the end")
    keep_best: bool = option(False, help="early stopping: at every evaluation also score prompts.val, keep the "
                                         "adapter with the best val score, and finish (final evaluation, export) "
                                         "with it instead of the last one (rl/selection.py)")
    best_metric: str = option("overall", help="with keep_best: the eval metric's score that chooses (higher is better)")

    def __post_init__(self):
        check(bool(self.output_dir.strip()), "output_dir", "must name a directory, got an empty string")
        check(0 <= self.seed < MAX_SEED, "seed", f"must be in [0, 2**63), got {self.seed}")
        check(self.max_minutes is None or self.max_minutes > 0, "max_minutes",
              f"must be > 0 (or null: no limit), got {self.max_minutes}")
        check(self.eval_every >= 0, "eval_every", f"must be >= 0 (0: only at start and end), got {self.eval_every}")
        for key in ("max_epochs", "ckpt_every", "keep_checkpoints", "gradient_accumulation_steps", "max_nonfinite"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for backend in self.log_backends:
            check(backend in BACKENDS, "log_backends", f"unknown backend '{backend}'; valid: {', '.join(BACKENDS)}")
        check("wandb" not in self.log_backends or bool(self.wandb_project), "wandb_project",
              "the wandb backend needs a project name: set run.wandb_project")
        check(bool(self.best_metric.strip()), "best_metric", "must name a score of the eval metric, got ''")
        check(self.mixed_precision in MIXED_PRECISION, "mixed_precision",
              f"must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        check(self.matmul_precision in MATMUL_PRECISION, "matmul_precision",
              f"must be one of {', '.join(MATMUL_PRECISION)}, got {self.matmul_precision!r}")


@dataclass
class EvalConfig:
    """Held-out evaluation: sample the eval prompts with the current policy and score them."""

    num_steps: int = option(20, help="Euler steps of the evaluation sampler")
    guidance_scale: float = option(1.0, help="CFG weight at evaluation")
    batch_size: int = option(32, help="evaluation batch size")
    seed: int = option(1234, help="noise seed: the same z_T for every evaluation, so curves compare like with like")
    num_images_logged: int = option(16, help="samples in the logged image grid")

    def __post_init__(self):
        check(0 <= self.seed < MAX_SEED, "seed", f"must be in [0, 2**63), got {self.seed}")
        for key in ("num_steps", "batch_size", "num_images_logged"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")


def check_optimizer_and_lora(cfg) -> None:
    """Range checks of the fields every trainer config shares (AdamW, clipping, LoRA), for its ``__post_init__``."""
    check(cfg.lr > 0, "lr", f"must be > 0, got {cfg.lr}")
    check(cfg.weight_decay >= 0, "weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    check(cfg.max_grad_norm > 0, "max_grad_norm", f"gradient clipping threshold, must be > 0, got {cfg.max_grad_norm}")
    check(cfg.lora_rank >= 1, "lora_rank", f"must be >= 1, got {cfg.lora_rank}")
    check(cfg.lora_alpha > 0, "lora_alpha", f"must be > 0 (the LoRA scale is alpha / rank), got {cfg.lora_alpha}")
    check(len(cfg.lora_targets) >= 1, "lora_targets", "needs at least one target module name, got none")


class EMAAdapters:
    """For trainer configs with an ``ema_decay`` field: the adapters to create and the one to evaluate.

    The trained adapter "default", plus "ema" -- its exponential moving average, the adapter that is evaluated,
    validated and exported -- when ``ema_decay`` > 0 (Flow-GRPO and DiffusionNFT evaluate an EMA too)."""

    ema_decay: float

    @property
    def adapters(self) -> tuple[str, ...]:
        return ("default", "ema") if self.ema_decay > 0 else ("default",)

    @property
    def eval_adapter(self) -> str:
        return self.adapters[-1]


def ema_decay_at(decay: float, step: int) -> float:
    """Flow-GRPO's EMA warm-up, min(decay, (1 + s) / (10 + s)) at optimizer step s (0-based, counted over the run).

    Without it the average drags the zero-initialised LoRA along for ~1 / (1 - decay) steps after training
    starts; with it the EMA follows closely at first and averages over longer windows later (0.9 from step 80, 0.99
    from step 890). Trainers derive s from the epoch and the fixed number of steps per epoch, so a resumed run
    continues the same schedule."""
    return min(decay, (1.0 + step) / (10.0 + step)) if decay > 0 else 0.0


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
    trained_module: Any = None  # the transformer as accelerator.prepare returned it (DDP, a DeepSpeed engine, itself)
    val_prompts: list[str] = field(default_factory=list)  # prompts.val, without any prompt of eval_prompts
    best: Any = None  # rl.selection.BestAdapter with run.keep_best (None: off)
    timer: Timer = field(default_factory=Timer)
    start_time: float = field(default_factory=time.time)
    # (epoch, adapter, scores) of the loop's last held-out evaluation in this process's lifetime: the final evaluation
    # of the same adapter at the same epoch reuses it (final_evaluation) instead of sampling the same images again
    last_held_out: tuple[int, str | None, dict[str, float]] | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.run_cfg.output_dir)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def out_of_time(self) -> bool:
        limit = self.run_cfg.max_minutes
        return limit is not None and (time.time() - self.start_time) / 60 >= limit

    def should_halt(self, stop) -> bool:
        """SIGTERM/SIGINT seen (``stop``, an rl.signals.GracefulExit) or out of time, on any process: every process
        must take the same decision, since checkpointing and stopping involve collectives."""
        return distributed.any_process(self.accelerator, stop.should_stop or self.out_of_time())


def stopped_by_signal(run: "Run", stop) -> bool:
    """After a trainer's loop: True when SIGTERM/SIGINT (on any process) ended it. The checkpoint is already written;
    the final evaluation and the export are left to the resumed run, so a preempted job exits within its grace
    period and `lora/` only ever holds the export of a finished run."""
    if distributed.any_process(run.accelerator, stop.should_stop):
        run.accelerator.print(f"stopped by {stop.received or 'a signal'}: checkpoint written in {run.run_dir}; "
                              f"continue with --resume latest")
        return True
    return False


def setup_lora(run: "Run", spec: lora.LoraSpec, lr: float, weight_decay: float,
               adapters: tuple[str, ...] = ("default",), max_grad_norm: float | None = None,
               micro_batch_size: int = 1) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    """Add the LoRA adapters, make only adapter "default" trainable, build AdamW and route through accelerate
    (DDP or a DeepSpeed engine; under DeepSpeed ``max_grad_norm`` becomes its gradient clipping and
    ``micro_batch_size`` its nominal per-process micro-batch, see rl.distributed.configure_deepspeed).

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
    if distributed.is_deepspeed(accel):
        if max_grad_norm is None:
            raise ValueError("setup_lora under DeepSpeed needs max_grad_norm (DeepSpeed clips inside its step)")
        distributed.configure_deepspeed(accel, max_grad_norm, micro_batch_size)
        distributed.zero3_leaf_blocks(accel, transformer)
    wrapped, optimizer = accel.prepare(transformer, optimizer)
    policy.set_forward_module(wrapped)
    run.trained_module = wrapped
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
def evaluate(run: Run, adapter: str | None = "default", prompts: list[str] | None = None, seed: int | None = None
             ) -> tuple[dict[str, float], Tensor]:
    """Held-out score of the policy (ODE sampler, fixed noise) on ``prompts`` (default: the eval prompts) with the
    noise of ``seed`` (default: ``eval.seed``). Returns (metrics, first images (N,3,H,W)).

    With several processes each samples its share of every evaluation batch; the noise is drawn for the whole
    batch on every process, so the score does not depend on the number of processes. Every process must call it
    (the per-sample scores are gathered)."""
    policy, cfg, accel = run.policy, run.eval_cfg, run.accelerator
    prompts = run.eval_prompts if prompts is None else prompts
    if run.eval_metric is None or not prompts:
        return {}, torch.empty(0)
    generator = torch.Generator(run.device).manual_seed(cfg.seed if seed is None else seed)
    totals: dict[str, list[Tensor]] = {}
    first = None
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start:start + cfg.batch_size]
        z_T = policy.noise(len(batch), generator)
        rows, real = distributed.padded_rows(len(batch), accel)
        row_prompts = [batch[i] for i in rows]
        if adapter is None:
            with lora.reference_policy(policy.transformer):
                traj = policy.sample(row_prompts, cfg.num_steps, cfg.guidance_scale, z_T=z_T[rows], keep_latents=False)
        else:
            with lora.using_adapter(policy.transformer, adapter):
                traj = policy.sample(row_prompts, cfg.num_steps, cfg.guidance_scale, z_T=z_T[rows], keep_latents=False)
        images = policy.decode(traj.z_tau)
        index = rows[:real] + [-1] * (len(rows) - real)  # -1: padding rows, dropped by the gather
        for k, v in metric_scores(run.eval_metric, images, row_prompts).items():
            totals.setdefault(k, []).append(distributed.gather_rows(accel, v, index, len(batch)).cpu())
        if first is None:
            mine = [(i, images[j].cpu()) for j, i in enumerate(rows[:real]) if i < cfg.num_images_logged]
            shown = sorted(distributed.gather_objects(accel, mine), key=lambda pair: pair[0])
            first = torch.stack([image for _, image in shown]) if shown else images[:0].cpu()
    from torchvision.utils import make_grid

    grid = make_grid(first, nrow=max(1, int(math.sqrt(len(first)))), padding=1)  # (3, H', W')
    # NaN marks a sample a score does not apply to (ShapesEval's per-kind scores): the mean is over the others
    return {f"eval/{k}": torch.cat(v).nanmean().item() for k, v in totals.items()}, grid


def all_finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def clipped_step(accelerator, optimizer, params: list[nn.Parameter], max_grad_norm: float,
                 loss_finite: bool | Tensor = True) -> tuple[float, bool]:
    """Clip gradients and step, unless the loss or the gradient norm is non-finite: then the gradients are dropped
    so a non-finite update never reaches the weights. Returns (grad norm, stepped).

    With several processes the gradients are already all-reduced here, so the norm, hence the decision, is the
    same on every process (rl.distributed.backward turns a non-finite loss into a non-finite gradient). Under
    DeepSpeed the engine has already taken the step — or refused it, on a non-finite gradient — inside the
    synchronised backward, clipping at ``gradient_clipping`` = ``max_grad_norm``: only its result is read."""
    if distributed.is_deepspeed(accelerator):
        return distributed.deepspeed_step_result(accelerator, optimizer)
    norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    norm = float(norm) if norm is not None else grad_norm(params)
    if not (bool(loss_finite) and math.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        if accelerator.scaler is not None:  # fp16: clip_grad_norm_ unscaled (and found the inf); the scale backs off
            accelerator.scaler.update()
        return norm, False
    optimizer.step()
    return norm, True


def grad_norm(params: list[nn.Parameter]) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


# ---------------------------------------------------------------------------------------------- checkpoints
def adapter_tensors(run: Run, name: str = "default") -> dict[str, Tensor]:
    """LoRA adapter ``name``'s state dict; for the trained adapter under DeepSpeed, its fp32 master weights (the
    module holds bf16/fp16 copies with mixed precision). A collective under DeepSpeed: every process calls it."""
    transformer = run.policy.transformer
    state = lora.adapter_state_dict(transformer, name)
    if name == "default":
        masters = distributed.master_weights(run.accelerator, lora.adapter_parameters(transformer, name))
        if not masters.keys() <= state.keys():
            raise RuntimeError(f"DeepSpeed master weights {sorted(masters.keys() - state.keys())[:3]} have no "
                               f"counterpart in the adapter's state dict")
        state.update(masters)
    return state


def load_adapter(run: Run, name: str, state: dict[str, Tensor]) -> None:
    """Inverse of :func:`adapter_tensors`: load ``state`` into adapter ``name`` (and, for the trained adapter under
    DeepSpeed, into its fp32 master weights). A collective under DeepSpeed: every process calls it."""
    transformer = run.policy.transformer
    lora.load_adapter_state_dict(transformer, {k: v.to(run.device) for k, v in state.items()}, name)
    if name == "default":
        distributed.load_master_weights(run.accelerator, lora.adapter_parameters(transformer, name), state)


def trained_state(run: Run, optimizer: torch.optim.Optimizer, adapters: tuple[str, ...]) -> tuple[dict, dict]:
    """(tensor groups, JSON state) of everything needed to resume: LoRA adapters and the optimizer (in torch
    AdamW's layout under every backend, so a checkpoint resumes with any number of processes or ZeRO stage)."""
    params = list(lora.adapter_parameters(run.policy.transformer, "default").values())
    tensors = {f"lora_{name}": adapter_tensors(run, name) for name in adapters}
    for name in adapters:  # a bf16 EMA's float32 average (policies.lora.ema_update); a resume is then bit-exact
        shadow = lora.ema_shadow_state(run.policy.transformer, name)
        if shadow:
            tensors[f"ema_shadow_{name}"] = shadow
    opt_state = distributed.optimizer_state_dict(run.accelerator, optimizer, params)
    opt_tensors, opt_meta = ckpt.optimizer_state_to_tensors(opt_state)
    tensors["optimizer"] = opt_tensors
    state = {"optimizer": opt_meta}
    # fp16: the loss scale and its clocks, or a resumed run starts again from 65536 and skips steps until it backs off
    # to where it was -- accelerate's GradScaler, or DeepSpeed's own dynamic scaler
    if run.accelerator.scaler is not None:
        state["grad_scaler"] = run.accelerator.scaler.state_dict()
    deepspeed_scale = distributed.loss_scaler_state(run.accelerator, optimizer)
    if deepspeed_scale is not None:
        state["deepspeed_loss_scaler"] = deepspeed_scale
    return tensors, state


def save(run: Run, epoch: int, optimizer, adapters: tuple[str, ...], extra: dict | None = None,
         extra_tensors: dict[str, dict[str, Tensor]] | None = None) -> Path | None:
    """Checkpoint after ``epoch`` completed epochs (written by the main process; under DeepSpeed every process
    first gathers its partitions). ``extra`` is JSON state, ``extra_tensors`` more tensor groups (e.g. a
    co-trained critic and its optimizer). Every process must call it."""
    accel = run.accelerator
    accel.wait_for_everyone()
    path = None
    if accel.is_main_process or distributed.is_deepspeed(accel):
        tensors, state = trained_state(run, optimizer, adapters)
    if accel.is_main_process:
        tensors.update(extra_tensors or {})
        state.update(config=run.config_dict, **(extra or {}))
        if run.best is not None:  # the adapter kept by validation (rl.selection)
            best_tensors, best_state = run.best.state()
            tensors.update(best_tensors)
            state.update(best_state)
        path = ckpt.save_checkpoint(run.run_dir, epoch, tensors, state, keep=run.run_cfg.keep_checkpoints)
    run.accelerator.wait_for_everyone()
    return path


# What a resumed run must share with the run it continues: the estimator (algo), what it optimises and with which
# critic (a run trained with --critic terminal and resumed with the default --critic stitchvm would switch critics
# half-way; a co-trained critic's state would be dropped), the model, the training prompts and the seed every
# (seed, epoch) generator is drawn from. Budgets, evaluation and logging may change.
RESUME_NODES = (("algo",), ("critic",), ("reward",), ("model",), ("prompts", "train"), ("run", "seed"))
# GRPO / DDPO keys only the dense estimator reads, and their defaults before session 15 (for the resume error's hint)
DENSE_ONLY_KEYS = ("gae_lambda", "dense_norm", "dense_calibration", "exact_ode", "values_at")
DEFAULTS_BEFORE = {"gae_lambda": 0.0, "dense_norm": "global", "dense_calibration": "none"}
# keys added after runs were saved, with the value that runs as those runs did: absent from a checkpoint and at this
# value now is the same run (unlike exact_ode, which runs saved before it ran as false, its default's opposite)
ADDED_AS_BEFORE = {"values_at": "stochastic",  # session 16: the critic at every stochastic step, as before
                   "sde_type": "flow"}  # session 18: Flow-GRPO's SDE, as before


def check_same_settings(saved: dict | None, now: dict | None, source: str, node: str = "algo") -> None:
    """A resumed run must go on with the settings it was saved with: a changed or newly added key of ``node`` (e.g.
    ``algo.exact_ode``, which a run saved before it existed ran as false) would silently change the run half-way,
    unless ADDED_AS_BEFORE names it with the value it now has (a run saved before it ran that way).
    Raises ConfigError naming every differing key; None on either side (no record) passes."""
    if saved is None or now is None:
        return
    now = json.loads(json.dumps(now))  # the checkpoint's JSON round trip: tuples become lists
    if not isinstance(saved, dict) or not isinstance(now, dict):
        saved, now, prefix = {node: saved}, {node: now}, ""
    else:
        prefix = f"{node}."
    missing = object()
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k, missing) != now.get(k, missing)
                  and not (node == "algo" and k not in saved and k in ADDED_AS_BEFORE and now[k] == ADDED_AS_BEFORE[k]))
    if node == "algo" and saved.get("advantages") == now.get("advantages") == "sparse":
        keys = [k for k in keys if k not in DENSE_ONLY_KEYS]  # unused by the sparse estimator
    if keys:
        only_saved, only_now = sorted(set(saved) - set(now)), sorted(set(now) - set(saved))
        if node == "algo" and only_saved and only_now:  # each side has keys the other lacks: another trainer's config
            raise ConfigError(f"checkpoint {source} was trained with another --algo: its algo settings have keys this "
                              f"one lacks ({', '.join(only_saved[:4])}{'…' if len(only_saved) > 4 else ''}) and lack "
                              f"({', '.join(only_now[:4])}{'…' if len(only_now) > 4 else ''}). Resume with the --algo "
                              f"(and --critic, --config) the run was started with")
        diff = ", ".join(f"{prefix}{k} (saved {saved.get(k, '<absent>')!r}, now {now.get(k, '<absent>')!r})"
                         for k in keys)
        old = [f"{prefix}{k}={v}" for k, v in DEFAULTS_BEFORE.items() if k in keys and saved.get(k, missing) == v]
        hint = (f" A run saved before session 15 has the old dense defaults: add {' '.join(old)} to resume it."
                if node == "algo" and old else "")
        raise ConfigError(f"checkpoint {source} was trained with other {node} settings: {diff}. Resume with the "
                          f"settings it was saved with (override each key back, or pass the same --critic / "
                          f"--config) or start a new run.{hint}")


def check_same_run(saved: dict | None, now: dict, source: str) -> None:
    """check_same_settings for every node of RESUME_NODES present in the checkpoint's saved config."""
    if not saved:
        return
    missing = object()
    for path in RESUME_NODES:
        a, b = saved, now
        for key in path:
            a = a.get(key, missing) if isinstance(a, dict) else missing
            b = b.get(key, missing) if isinstance(b, dict) else missing
        if a is missing:  # a checkpoint written before this node was recorded
            continue
        check_same_settings(a, None if b is missing else b, source, ".".join(path))


def restore(run: Run, source: str, optimizer, adapters: tuple[str, ...]) -> tuple[int, dict]:
    """Load a checkpoint ('latest', a run dir or a step dir) into the policy and optimizer; returns (epoch, state)."""
    source = str(run.run_dir) if source == "latest" else source
    if run.accelerator.is_main_process:  # renames, so one process; the others then read the repaired directory
        ckpt.recover_resave(source)
    run.accelerator.wait_for_everyone()
    loaded = ckpt.load_checkpoint(source)
    held = sorted(k.removeprefix("lora_") for k in loaded.tensors if k.startswith("lora_"))
    # settings first: a changed lora_rank is then a config error naming the key, not a shape mismatch in the load
    check_same_run(loaded.state.get("config"), run.config_dict, source)
    for name in adapters:
        if f"lora_{name}" not in loaded.tensors:  # e.g. algo.ema_decay turned on for a run saved without it
            raise ConfigError(f"checkpoint {source} has no adapter '{name}' (it holds {held}); resume with the "
                              f"settings it was saved with (algo.ema_decay > 0 adds 'ema') or start a new run")
        load_adapter(run, name, loaded.tensors[f"lora_{name}"])
        if f"ema_shadow_{name}" in loaded.tensors:
            lora.load_ema_shadow_state(run.policy.transformer, name, loaded.tensors[f"ema_shadow_{name}"])
    trained = lora.adapter_parameters(run.policy.transformer, "default")
    opt_state = ckpt.optimizer_state_from_tensors(loaded.tensors["optimizer"], loaded.state["optimizer"])
    distributed.load_optimizer_state_dict(run.accelerator, optimizer, list(trained.values()), opt_state)
    if run.accelerator.scaler is not None and loaded.state.get("grad_scaler"):
        run.accelerator.scaler.load_state_dict(loaded.state["grad_scaler"])
    if loaded.state.get("deepspeed_loss_scaler"):
        distributed.load_loss_scaler_state(run.accelerator, optimizer, loaded.state["deepspeed_loss_scaler"])
    # Every trainer draws its randomness from generators seeded by (seed, epoch, stream), so a resumed run repeats
    # its epochs without the global streams. Those are restored for anything else (Python, NumPy, torch CPU), but
    # not the per-device CUDA states: they would tie a checkpoint to its host's GPU count, and the checkpoint holds
    # process 0's states only, so process k's global streams are re-seeded as a fresh run seeds them.
    ckpt.restore_rng(loaded.state["rng"], cuda=False)
    if run.accelerator.process_index > 0:
        seed_everything(run.run_cfg.seed + run.accelerator.process_index)
    if run.best is not None:
        run.best.load(loaded.tensors, loaded.state)
    run.logger.resume_at(loaded.step)
    if run.accelerator.is_main_process:  # only now: a refused resume leaves the run's config.yaml as it was
        to_yaml(run.config_dict, run.run_dir / "config.yaml")
    return loaded.step, loaded.state


def print_epoch(run: Run, epoch: int, metrics: dict) -> None:
    """The console's line for an epoch (epoch 0: the starting evaluation); metrics.jsonl / TensorBoard hold all."""
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.split("/")[0] in ("reward", "eval", "loss"))
    run.accelerator.print(f"epoch {epoch}/{run.run_cfg.max_epochs}: {shown}")


def print_resumed(run: Run, epoch: int) -> None:
    done = epoch >= run.run_cfg.max_epochs
    run.accelerator.print(f"resumed from epoch {epoch}" + (
        f": nothing left to train (run.max_epochs={run.run_cfg.max_epochs}; raise it to train on), only the final "
        f"evaluation runs" if done else ""))


def held_out(run: Run, epoch: int, adapter: str | None = "default") -> tuple[dict[str, float], Tensor]:
    """The loop's held-out evaluation after ``epoch`` epochs (``evaluate`` on the eval prompts), remembered for
    ``final_evaluation``."""
    scores, images = evaluate(run, adapter)
    run.last_held_out = (epoch, adapter, dict(scores))
    return scores, images


def final_evaluation(run: Run, epoch: int, adapter: str | None = "default") -> dict[str, float]:
    """The final held-out scores after ``epoch`` epochs. The evaluation is deterministic (fixed noise), so when the
    loop has just scored this adapter at this epoch (``held_out``) its scores are returned instead of sampling the
    same images again, unless keep_best (``run.best``) has loaded the kept adapter's weights into it."""
    last = run.last_held_out
    if run.best is None and last is not None and last[0] == epoch and last[1] == adapter:
        return dict(last[2])
    return evaluate(run, adapter)[0]


def finish(run: Run, adapter: str = "default") -> Path | None:
    """Export the trained adapter in diffusers format to ``run_dir/lora`` (written by the main process; every
    process must call it)."""
    accel = run.accelerator
    accel.wait_for_everyone()
    if not run.run_cfg.export_lora:
        return None
    state = adapter_tensors(run, adapter) if accel.is_main_process or distributed.is_deepspeed(accel) else None
    if not accel.is_main_process:
        return None
    return lora.export_diffusers(run.policy.transformer, run.run_dir / "lora", adapter, state=state)


def log_mean_std(prefix: str, x: Tensor) -> dict[str, float]:
    x = x.float()
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return {f"{prefix}/mean": math.nan, f"{prefix}/std": math.nan}
    return {f"{prefix}/mean": finite.mean().item(), f"{prefix}/std": finite.std().item() if finite.numel() > 1 else 0.0}
