"""DRaFT-K (Clark et al., arXiv 2309.17400), with the StitchVM early stop (StitchVM paper Eq. 64, Table 3).

Direct reward fine-tuning: the sampler is a differentiable function of the LoRA weights, so the reward of a
sample can be maximised by gradient ascent through it. DRaFT-K truncates back-propagation to the last K steps
(K = 1, 3): the first steps run without a graph, the last K with one. Each optimizer step:

1. Rollout. From z_T ~ N(0, I), steps 0 .. tau-K-1 without gradient, steps tau-K .. tau-1 with gradient
   (``truncated_rollout``). Terminal critic: tau = N (finish the sample). Value critic: stop early,
   tau ~ U{tau_min..tau_max} (paper: U{3..7} of 10 steps), no finishing, no decode.
2. Objective. V(z_tau) from the critic, differentiable in z_tau: r(D(z_0)) for ``terminal`` (the reward must be
   differentiable), StitchVM / Tweedie value at sigma_tau otherwise. Loss (Eq. 64)
       L = -mean V(z_tau) + lambda R(theta; theta_0),
       R(theta; theta_0) = mean_k ||v_theta(z_k) - v_theta0(z_k)||^2 over the K back-propagated steps,
   the velocity-space distance to the pretrained model (adapters off); the paper leaves R unspecified — this is
   the squared-error form of the KL between the two samplers' step distributions. For K = 1 its gradient
   is that at a fixed z_k; for K > 1 it also flows through z_k (the same graph as the objective's).
3. Optimise: AdamW on the LoRA, gradient clipping; optional EMA of the weights (evaluation and export use it).
4. Critic co-training (``critic.cotrain``): DRaFT keeps no finished trajectories, so the critic is fitted on a
   fresh ODE rollout of the current policy each epoch (rl/cotrain.py ``rollout_and_update``).
5. Log, evaluate, checkpoint.

With the Tweedie critic the value's denoiser is the policy itself, so the gradient also flows through the
one-step jump z_tau -> z_hat_0 (DRaFT with a final big Euler step). StitchVM's head runs on the base weights
(adapters bypassed) and only passes the gradient through z_tau.

Notation:  K = ``backprop_steps``, lambda = ``reg_lambda``, tau the stop step, V the critic's value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from policies import lora, samplers
from rl import common, cotrain, distributed
from rl import policy_gradient as pg
from rl.checkpoint import NonFiniteError
from rl.config import ConfigError, check, option
from rl.signals import GracefulExit


@dataclass
class DraftConfig(common.EMAAdapters):
    """DRaFT-K hyper-parameters (StitchVM Table 3's setup where given; Shapes sizes in configs/algo/draft.yaml)."""

    num_steps: int = option(10, help="sampler steps N (paper: 10)")
    backprop_steps: int = option(1, help="K: back-propagate through the last K steps before tau (DRaFT-1, DRaFT-3)")
    tau_min: int = option(3, help="earliest stop tau with a value critic (paper: 3 of 10)")
    tau_max: int = option(7, help="latest stop tau with a value critic (paper: 7 of 10)")
    eta: float = option(0.0, help="sampler noise (0 = ODE; > 0: SDE with reparameterised noise)")
    guidance_scale: float = option(1.0, help="CFG weight of the rollout (paper: 1.0)")
    reg_lambda: float = option(0.01, help="lambda of R(theta; theta_0) = ||v_theta - v_theta0||^2 (Eq. 64; paper 0.01)")
    prompts_per_epoch: int = option(16, help="prompts per epoch (one sample each)")
    train_batch_size: int = option(8, help="samples per optimizer step")
    lr: float = option(5e-5, help="AdamW learning rate of the LoRA (paper: 5e-5)")
    weight_decay: float = option(0.0, help="AdamW weight decay (paper: 0)")
    max_grad_norm: float = option(1.0, help="gradient clipping (paper: 1.0)")
    ema_decay: float = option(0.0, help="EMA of the LoRA (adapter 'ema', warm-up min(decay, (1+s)/(10+s)) at optimizer "
                                        "step s), the one evaluated, validated and exported; 0 = off, the trained one")
    grad_checkpointing: bool = option(False, help="recompute transformer activations in the backward (GPU memory)")
    cotrain_batch_size: int = option(32, help="rollout batch of the co-training refresh (critic.cotrain)")
    lora_rank: int = option(32, help="LoRA rank r (paper: 32)")
    lora_alpha: float = option(64.0, help="LoRA alpha (paper: 64)")
    lora_targets: tuple[str, ...] = option(lora.SD3_TARGETS, help="LoRA target modules")

    def __post_init__(self):
        check(self.num_steps >= 1, "num_steps", f"must be >= 1, got {self.num_steps}")
        check(1 <= self.backprop_steps <= self.num_steps, "backprop_steps",
              f"K must be in 1..num_steps ({self.num_steps}), got {self.backprop_steps}")
        check(self.backprop_steps <= self.tau_min <= self.tau_max <= self.num_steps, "tau_min/tau_max",
              f"need backprop_steps ({self.backprop_steps}) <= tau_min <= tau_max <= num_steps ({self.num_steps}), "
              f"got {self.tau_min}..{self.tau_max}")
        check(self.eta >= 0, "eta", f"must be >= 0, got {self.eta}")
        check(self.reg_lambda >= 0, "reg_lambda", f"must be >= 0, got {self.reg_lambda}")
        check(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        common.check_optimizer_and_lora(self)
        for key in ("prompts_per_epoch", "train_batch_size", "cotrain_batch_size"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")


# ------------------------------------------------------------------------------------------------ pure parts
class DraftRollout(NamedTuple):
    z_tau: Tensor       # (B, C, h, w), differentiable through the last K steps only
    latents: Tensor     # (B, K, C, h, w) inputs z_k of the back-propagated steps (detached)
    velocities: Tensor  # (B, K, C, h, w) v_theta(z_k) at them (with graph)
    sigmas: Tensor      # (K,) their sigmas


def truncated_rollout(velocity_fn: Callable[[Tensor, Tensor], Tensor], z_T: Tensor, sigmas: Tensor, tau: int,
                      backprop_steps: int, eta: float = 0.0, generator: torch.Generator | None = None) -> DraftRollout:
    """Integrate z_T to z_tau; only the last ``backprop_steps`` steps are recorded for autograd (DRaFT-K).

    Args:
        velocity_fn: v(z, sigma (B,)) with the prompts and CFG bound (``FlowPolicy.velocity_fn``).
        z_T: (B, C, h, w) initial noise.  sigmas: (N+1,) schedule.  tau: stop after this many steps (1..N).
        backprop_steps: K, 1 <= K <= tau.  eta: 0 = Euler ODE; > 0 = SDE with the noise as a fixed input.
    """
    num_steps = sigmas.numel() - 1
    if not 1 <= backprop_steps <= tau <= num_steps:
        raise ValueError(f"need 1 <= K ({backprop_steps}) <= tau ({tau}) <= N ({num_steps})")
    first = tau - backprop_steps
    z = z_T
    if first > 0:
        with torch.no_grad():
            z = samplers.sample(velocity_fn, z_T, sigmas, eta=eta, stop_at=first, generator=generator,
                                keep_latents=False).z_tau
    z = z.detach()
    latents, velocities = [], []
    for i in range(first, tau):
        v = velocity_fn(z, sigmas[i].expand(z.shape[0]).to(z.device))
        latents.append(z.detach())
        velocities.append(v)
        z = samplers.sde_step(v, z, sigmas[i], sigmas[i + 1], eta, generator=generator,
                              sigma_at_one=sigmas[1]).prev_sample
    return DraftRollout(z, torch.stack(latents, 1), torch.stack(velocities, 1), sigmas[first:tau].clone())


class DraftLoss(NamedTuple):
    loss: Tensor   # scalar: -mean V + lambda * reg
    value: Tensor  # scalar: mean V(z_tau)
    reg: Tensor    # scalar: mean ||v_theta - v_ref||^2 (0 without a reference)


def draft_loss(value: Tensor, v_theta: Tensor | None = None, v_ref: Tensor | None = None,
               reg_lambda: float = 0.0) -> DraftLoss:
    """Eq. 64: L = -mean V(z_tau) + lambda mean ||v_theta - v_ref||^2 (squared error averaged over elements).

    Args:
        value: (B,) V(z_tau), differentiable.  v_theta: (B, K, C, h, w) policy velocities at the back-propagated
        steps.  v_ref: the same for the reference (adapters off), no grad; None skips the term.
    """
    value_mean = value.float().mean()
    if v_theta is not None and v_ref is not None:
        reg = ((v_theta.float() - v_ref.float().detach()) ** 2).mean()
    else:
        reg = torch.zeros((), device=value.device)
    return DraftLoss(-value_mean + reg_lambda * reg, value_mean.detach(), reg.detach())


# ------------------------------------------------------------------------------------------------ stages
def optimise(run: common.Run, cfg: DraftConfig, prompts: list[str], optimizer, params, epoch: int) -> dict[str, float]:
    """Stages 1-3 for one epoch's prompts: truncated rollout, value, loss, AdamW (+ EMA) per optimizer step.

    An optimizer step covers ``train_batch_size`` prompts (global): every process draws their tau and initial
    noise, then back-propagates its slice of them in ``run.gradient_accumulation_steps`` micro-batches
    (rl.distributed); SDE noise (eta > 0) is per process. Logged values are means over the global batch."""
    policy, critic, accel = run.policy, run.critic, run.accelerator
    transformer = policy.transformer
    rng, generator = pg.epoch_generator(run, epoch, 1)
    sde_generator = distributed.process_generator(run.run_cfg.seed, epoch, 1, accel)
    sigmas = policy.sigmas(cfg.num_steps, run.device)
    names = ("reward/mean", "loss/total", "loss/reg")
    sums, norms, taus, skipped = [], [], [], 0
    first_step = epoch * math.ceil(len(prompts) / cfg.train_batch_size)  # the EMA warm-up's clock (resume-safe)
    for start in range(0, len(prompts), cfg.train_batch_size):
        batch = prompts[start:start + cfg.train_batch_size]  # the optimizer step's global prompts
        tau = int(rng.integers(cfg.tau_min, cfg.tau_max + 1)) if critic.dense else cfg.num_steps
        z_T = policy.noise(len(batch), generator)  # every prompt's noise, on every process
        mine = distributed.process_slice(len(batch), accel)
        micros = distributed.micro_batches(mine.stop - mine.start, run.run_cfg.gradient_accumulation_steps)
        step_sums = torch.zeros(len(names), dtype=torch.float64, device=run.device)  # read once, at the end
        optimizer.zero_grad(set_to_none=True)
        finite = True
        for m, micro in enumerate(micros):
            local = batch[mine][micro]
            share = distributed.loss_weight(len(local), len(batch), accel)
            with torch.no_grad():
                cond = policy.encode_prompts(local)
            with distributed.gradient_sync(accel, run.trained_module, m == len(micros) - 1):
                with run.timer("rollout"), accel.autocast():
                    roll = truncated_rollout(policy.velocity_fn(cond, cfg.guidance_scale), z_T[mine][micro], sigmas,
                                             tau, cfg.backprop_steps, cfg.eta, sde_generator)
                with run.timer("value"):
                    value = critic.value(roll.z_tau, sigmas[tau], local)
                if not value.requires_grad:
                    raise ValueError(f"DRaFT needs V(z_tau) differentiable in z_tau, but {type(critic).__name__} "
                                     f"returned no gradient: with --critic terminal the reward must be differentiable "
                                     f"(not {type(run.reward).__name__}); mc is never differentiable")
                v_ref = None
                if cfg.reg_lambda > 0:
                    # under the rollout's autocast (accelerate's prepared forward applies it as well), so that
                    # R(theta; theta0) is exactly 0 at theta = theta0
                    with torch.no_grad(), lora.reference_policy(transformer), accel.autocast():
                        k = roll.latents.shape[1]
                        flat = roll.latents.flatten(0, 1)  # (B*K, C, h, w), sample-major (b0 k0, b0 k1, ...)
                        v_ref = policy.velocity(flat, roll.sigmas.repeat(len(local)), cond.repeat(k),
                                                cfg.guidance_scale)
                        v_ref = v_ref.view_as(roll.velocities)
                out = draft_loss(value, roll.velocities, v_ref, cfg.reg_lambda)
                with run.timer("update"):
                    finite = distributed.backward(accel, out.loss * share) & finite
            step_sums += torch.stack([v.detach().to(torch.float64) for v in (out.value, out.loss, out.reg)]) * len(local)
        with run.timer("update"):
            norm, stepped = common.clipped_step(accel, optimizer, params, cfg.max_grad_norm, finite)
        sums.append(step_sums / len(batch))
        norms.append(norm)
        taus.append(float(tau))
        if not stepped:
            skipped += 1
            continue
        if cfg.ema_decay > 0:
            decay = common.ema_decay_at(cfg.ema_decay, first_step + len(norms) - 1)
            lora.ema_update(transformer, "default", "ema", decay)
    means = distributed.sum_over_processes(accel, torch.stack(sums)).cpu()  # (steps, 3)
    out = {name: float(np.nanmean(means[:, i].numpy())) for i, name in enumerate(names)}
    out.update({"policy/grad_norm": float(np.nanmean(norms)), "train/tau": float(np.mean(taus)),
                "train/skipped_updates": float(skipped)})
    return out


# ------------------------------------------------------------------------------------------------ the loop
def train(run: common.Run, cfg: DraftConfig, resume: str | None = None) -> dict[str, float]:
    """DRaFT-K. Returns the final evaluation metrics."""
    critic = run.critic
    if not critic.dense and not run.reward.differentiable:
        raise ConfigError(f"DRaFT with --critic terminal back-propagates through the reward, but "
                          f"{type(run.reward).__name__} is not differentiable: use a differentiable reward (CLIP "
                          f"score, HPSv2, aesthetic, ...) or a value critic (--critic stitchvm)")
    spec = lora.LoraSpec(r=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets)
    accumulation = run.run_cfg.gradient_accumulation_steps
    distributed.check_layout(run.accelerator, accumulation, cfg.prompts_per_epoch, cfg.train_batch_size,
                             rows_name="algo.prompts_per_epoch")
    micro = cfg.train_batch_size // (run.accelerator.num_processes * accumulation)
    params, optimizer = common.setup_lora(run, spec, cfg.lr, cfg.weight_decay, cfg.adapters, cfg.max_grad_norm,
                                          micro)
    if cfg.grad_checkpointing:
        run.policy.transformer.enable_gradient_checkpointing()
    exclude = cotrain.shared_parameters(run)
    cotrain.freeze(critic, exclude)  # V is differentiated in z_tau only
    critic_trainer = cotrain.build(run, exclude)
    start_epoch, history, _ = pg.start_run(run, optimizer, cfg.adapters, resume, critic_trainer, cfg.eval_adapter)

    consecutive_bad, epoch = 0, start_epoch - 1  # epoch: the last one done (a finished run resumed: start_epoch)
    with GracefulExit() as stop:
        for epoch in range(start_epoch, run.run_cfg.max_epochs):
            prompts = common.prompt_batch(run.train_prompts, cfg.prompts_per_epoch, epoch, run.run_cfg.seed)
            # 1-3. truncated rollout, V(z_tau), -V + lambda R, AdamW (+ EMA)
            metrics = {"train/epoch": epoch + 1, **optimise(run, cfg, prompts, optimizer, params, epoch)}
            consecutive_bad = consecutive_bad + 1 if metrics["train/skipped_updates"] else 0
            # 4. critic co-training on a fresh rollout of the current policy
            if critic_trainer is not None:  # on this process's share of the prompts
                generator = distributed.process_generator(run.run_cfg.seed, epoch, 3, run.accelerator)
                mine = prompts[distributed.process_slice(len(prompts), run.accelerator)]
                with run.timer("cotrain"):
                    metrics.update(cotrain.rollout_and_update(run, critic_trainer, mine, cfg.num_steps, generator,
                                                              cfg.guidance_scale, cfg.cotrain_batch_size))
            if consecutive_bad >= run.run_cfg.max_nonfinite:
                pg.save(run, epoch + 1, optimizer, cfg.adapters, {"history": history}, critic_trainer)
                raise NonFiniteError(f"{consecutive_bad} consecutive epochs with non-finite losses or gradients "
                                     f"(last epoch {epoch + 1}); lower algo.lr or check the reward/critic. "
                                     f"The last finite state is checkpointed in {run.run_dir}")
            # 5. evaluate, log, checkpoint
            if pg.end_epoch(run, epoch, metrics, optimizer, cfg.adapters, history, {}, stop, critic_trainer,
                            cfg.eval_adapter):
                break
    if common.stopped_by_signal(run, stop):
        return {}
    return pg.finish_run(run, epoch + 1, cfg.eval_adapter)
