"""Flow-GRPO (Liu et al., arXiv 2505.05470), with dense per-step advantages from a value critic.

Group relative policy optimisation on the flow SDE. Each epoch:

1. Rollout. G samples per prompt with the SDE sampler (Eq. 9, policies/samplers.py), keeping every latent and
   every step's log pi_old. "Fast" variant: stochastic steps only inside a window of ``sde_window`` consecutive
   steps starting at U{lo..hi}, ODE elsewhere; only the window is trained. CFG on (``guidance_scale`` > 1, the
   same CFG velocity in rollout and training) or off.
2. Reward R = r(D(z_N)) of the finished samples; with a value critic also V(z_k) at every visited latent.
3. Advantages, per step k (``advantages``):
     sparse  (Flow-GRPO)  A_k = (R - mean_group R) / (std + eps), the same for every step of a sample;
     dense   (critic)     A_k = GAE_lambda(delta)_k, delta_k = V(z_{k+1}) - V(z_k), V(z_N) := R
                          (lambda = 0: the value gained by step k; lambda = 1, the default: R - V(z_k)),
                          centred per (group, step) and divided by the (group, step) std, the default, or the
                          global one (``dense_norm``). Across ODE steps V is
                          carried exactly, V(z_k) = V(z_{k+1}) (``exact_ode``): after a Fast window's last
                          stochastic step the value is R itself, so the critic is called only at the window's
                          latents, and with lambda = 0 the window's raw advantages sum to R - V(z_window start).
                          ``dense_calibration: batch`` (default) first rescales each latent's V around its group
                          mean by the batch's least-squares slope of R on V (rl.advantages.calibrate_values).
   Both clipped to [-adv_clip, adv_clip].
4. Policy update on a random ``timestep_fraction`` of each sample's stochastic steps (Eq. 8); with
   ``values_at: trained`` they are drawn per group before stage 2, and the critic is asked at their latents only:
   a whole-trajectory SDE (``sde_window: 0``) then costs the critic what a Fast window does.
     rho_k = pi_theta(z_{k+1} | z_k) / pi_old(z_{k+1} | z_k)
     L = mean max(-A_k rho_k, -A_k clip(rho_k, 1 - eps, 1 + eps)) + beta_KL mean ||mu_theta - mu_ref||^2 / (2 std_k^2)
   with the reference = the model with its LoRA adapters disabled.
5. Critic co-training on these trajectories (``critic.cotrain``, rl/cotrain.py).
6. Log, evaluate, checkpoint.

Why dense advantages reduce variance. The sampler is an MDP with state z_k, action z_{k+1} and one reward R
at the end, so Q(z_k, z_{k+1}) = V(z_{k+1}) and delta_k is the advantage of the action actually taken. The
sparse estimator credits every step with R, i.e. with the noise of all *other* steps too; delta_k only
carries step k's own noise (its expectation given z_k is 0 for an exact V). R - V(z_k) (lambda = 1) keeps the
noise of the later steps but stays unbiased for any V (a state baseline). Centring per (group, step) removes
a critic's systematic drift along sigma. Uncalibrated, a global (not per-step) scale keeps the steps' relative
weight, so a step where the critic sees nothing happen is not blown up to unit variance; calibrated, such a step
carries the sparse credit rather than the critic's noise, and the default scales per (group, step) as Flow-GRPO
scales per group.
The estimator is only as good as the critic where it is asked. With lambda = 0 one value at sigma_{k+1} splits
each reward between a Fast window's two steps; a critic that barely ranks a group's samples there (the Shapes
StitchVM at sigma 0.7-0.96, benchmarks/window_credit.py) hands its noise to both, and the sparse twins trained
better (docs/bench/trainers_session14.md). With lambda = 1, group noise and ``dense_norm: group_step`` the window's
first latent is shared within a group, so its step gets exactly the sparse credit, and the second gets
R - V(z_{k+1}), a state baseline (calibrated: scaled by the batch's slope of R on V). These are the defaults since
session 15: validation plateaus .58-.62 against .52-.57 for lambda 0 (docs/bench/trainers_session15.md).
In the Fast window that is all V can do. With the SDE at every step (``sde_window: 0``) lambda 1, calibrated, with
the global scale is 4-7x less variable than sparse credit (CPU, docs/bench/trainers_session16.md): R - V(z_k) is small
at the late steps whose log-prob gradients are largest. ``group_step`` would scale those residuals back up, so there
use ``dense_norm: global``, and ``values_at: trained`` to pay for V only at the trained steps. On Shapes that run
validates above its sparse twin at 2/3 of the KL, but both train worse in 10 minutes than a Fast window
(docs/bench/trainers_session17.md).

Notation:
    symbol          here
    G               group_size
    eps (clip)      clip_range
    beta_KL         kl_beta
    pi_old          rollout.log_probs (B, N), mean over latent elements
    A_k             adv (B, N)
    V(z_k)          values (B, N+1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from policies import lora
from rl import common, cotrain, distributed
from rl import policy_gradient as pg
from rl.advantages import calibration_slope, dense_advantages, group_normalize
from rl.checkpoint import NonFiniteError
from rl.config import ConfigError, check, option
from rl.signals import GracefulExit


@dataclass
class GRPOConfig(common.EMAAdapters):
    """Flow-GRPO hyper-parameters (the paper's defaults where it gives them; Shapes sizes in configs/algo/grpo.yaml)."""

    num_steps: int = option(10, help="sampler steps N (Flow-GRPO: 10 for training)")
    eta: float = option(0.7, help="SDE noise level (Flow-GRPO: 0.7); must be > 0, an ODE step has no log-prob")
    sde_type: Literal["flow", "cps"] = option("flow", help=pg.SDE_TYPE_HELP)
    guidance_scale: float = option(1.0, help="CFG weight in rollout and training (Flow-GRPO: 4.5; 1.0 = CFG-free)")
    sde_window: int = option(0, help="Flow-GRPO-Fast: stochastic steps only in a window of this many steps "
                                     "(0 = SDE at every step)")
    sde_window_start: tuple[int, int] = option((0, 0), help="(lo, hi): the window starts at step U{lo..hi}")
    prompts_per_epoch: int = option(8, help="prompts per epoch")
    group_size: int = option(8, help="G, samples per prompt")
    group_noise: bool = option(False, help="a group's G samples share their initial noise z_T (DanceGRPO), so the "
                                            "rewards within a group differ only through the SDE steps")
    rollout_batch_size: int = option(32, help="samples per rollout forward (a multiple of group_size)")
    train_batch_size: int = option(16, help="samples per optimizer step")
    value_batch_size: int = option(64, help="latents per critic call (dense values)")
    timestep_fraction: float = option(1.0, help="fraction of each sample's stochastic steps trained on")
    inner_epochs: int = option(1, help="passes over each epoch's samples")
    clip_range: float = option(1e-4, help="eps of the ratio clip (Flow-GRPO: 1e-4, log-probs averaged)")
    adv_clip: float = option(5.0, help="advantages clipped to [-adv_clip, adv_clip]")
    adv_eps: float = option(1e-4, help="eps added to the std in the normalisations")
    global_std: bool = option(False, help="sparse: divide by the batch std instead of the group's")
    kl_beta: float = option(0.04, help="beta_KL, weight of the KL to the reference (adapters off); 0 = none")
    advantages: Literal["sparse", "dense"] = option(
        "sparse", help="sparse: group-normalised R shared by every step; dense: per-step GAE on the critic's V")
    gae_lambda: float = option(1.0, help="dense: lambda of GAE (0: V(z_k+1) - V(z_k); 1: R - V(z_k))")
    dense_norm: Literal["global", "group_step", "none"] = option(
        "group_step", help="dense: after centring per (group, step) divide by the global std, the (group, step) std, "
                       "or nothing")
    exact_ode: bool = option(True, help=pg.EXACT_ODE_HELP)
    values_at: Literal["stochastic", "trained"] = option("stochastic", help=pg.VALUES_AT_HELP)
    dense_calibration: Literal["none", "batch"] = option("batch", help=pg.DENSE_CALIBRATION_HELP)
    lr: float = option(3e-4, help="AdamW learning rate of the LoRA (Flow-GRPO: 3e-4)")
    weight_decay: float = option(1e-4, help="AdamW weight decay")
    max_grad_norm: float = option(1.0, help="gradient clipping")
    ema_decay: float = option(0.0, help="EMA of the LoRA (adapter 'ema', warm-up min(decay, (1+s)/(10+s)) at optimizer "
                                        "step s), the one evaluated, validated and exported; 0 = off, the trained one")
    lora_rank: int = option(32, help="LoRA rank r")
    lora_alpha: float = option(64.0, help="LoRA alpha")
    lora_targets: tuple[str, ...] = option(lora.SD3_TARGETS, help="LoRA target modules")

    def __post_init__(self):
        check(self.num_steps >= 1, "num_steps", f"must be >= 1, got {self.num_steps}")
        check(self.eta > 0, "eta", f"GRPO needs a stochastic sampler (eta > 0): the deterministic ODE step "
                                   f"(eta = 0) has no log-probability; got {self.eta}")
        check(self.group_size >= 2, "group_size", f"group normalisation needs >= 2 samples per prompt, got "
                                                  f"{self.group_size}")
        check(self.rollout_batch_size >= 1, "rollout_batch_size", f"must be >= 1, got {self.rollout_batch_size}")
        check(self.rollout_batch_size % self.group_size == 0, "rollout_batch_size",
              f"must be a multiple of group_size ({self.group_size}) so a group shares one SDE window, got "
              f"{self.rollout_batch_size}")
        pg.check_window(self.num_steps, self.sde_window, self.sde_window_start)
        pg.check_sde(self)
        check(0 < self.timestep_fraction <= 1, "timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")
        check(self.clip_range > 0, "clip_range", f"must be > 0, got {self.clip_range}")
        check(self.adv_clip > 0, "adv_clip", f"must be > 0, got {self.adv_clip}")
        check(self.adv_eps > 0, "adv_eps", f"must be > 0 (a group of equal rewards has std 0), got {self.adv_eps}")
        check(self.kl_beta >= 0, "kl_beta", f"must be >= 0, got {self.kl_beta}")
        check(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        check(0 <= self.gae_lambda <= 1, "gae_lambda", f"must be in [0, 1], got {self.gae_lambda}")
        pg.check_values_at(self)
        common.check_optimizer_and_lora(self)
        for key in ("prompts_per_epoch", "train_batch_size", "value_batch_size", "inner_epochs"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")

    def update_settings(self, epoch: int) -> pg.UpdateSettings:
        per_epoch = pg.steps_per_epoch(self.prompts_per_epoch * self.group_size, self.train_batch_size, self.inner_epochs)
        return pg.UpdateSettings(self.eta, self.guidance_scale, self.clip_range, self.kl_beta, self.train_batch_size,
                                 self.timestep_fraction, self.inner_epochs, self.max_grad_norm, self.ema_decay,
                                 epoch * per_epoch)


def check_critic(critic, advantages: str) -> None:
    """Dense advantages need V at every sigma; the terminal critic only scores finished samples."""
    if advantages == "dense" and not critic.dense:
        raise ConfigError(f"algo.advantages=dense needs a value critic (V at every sigma), but "
                          f"{type(critic).__name__} only scores finished samples: use --critic stitchvm (or tweedie, "
                          f"mc), or algo.advantages=sparse for the classic terminal-reward version")


# ------------------------------------------------------------------------------------------------ advantages
def grpo_advantages(rewards: Tensor, values: Tensor | None, sde_mask: Tensor, cfg: GRPOConfig) -> Tensor:
    """Stage 3: per-step advantages (B, N), 0 on ODE steps (module docstring).

    Args:
        rewards: (B,) realised rewards, groups of G consecutive rows.
        values: (B, N+1) critic values along the trajectories (dense), or None (sparse).
        sde_mask: (B, N) the steps that get advantages: the stochastic ones (values_at: trained, the drawn ones).
    """
    if cfg.advantages == "sparse":
        adv = group_normalize(rewards, cfg.group_size, cfg.adv_eps, cfg.global_std).adv  # (B,)
        adv = adv.view(-1, 1).expand_as(sde_mask)
    else:
        if values is None:
            raise ValueError("dense advantages need the critic's values along the trajectories")
        adv = dense_advantages(values, rewards, sde_mask, cfg.gae_lambda, cfg.group_size, cfg.dense_norm,
                               cfg.adv_eps, cfg.exact_ode, cfg.dense_calibration == "batch")
    return torch.where(sde_mask, adv.clamp(-cfg.adv_clip, cfg.adv_clip), torch.zeros_like(adv))


# ------------------------------------------------------------------------------------------------ the loop
def train(run: common.Run, cfg: GRPOConfig, resume: str | None = None) -> dict[str, float]:
    """Flow-GRPO. Returns the final evaluation metrics."""
    critic = run.critic
    check_critic(critic, cfg.advantages)
    spec = lora.LoraSpec(r=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets)
    accumulation = run.run_cfg.gradient_accumulation_steps
    distributed.check_layout(run.accelerator, accumulation, cfg.prompts_per_epoch * cfg.group_size,
                             cfg.train_batch_size, cfg.rollout_batch_size)
    micro = cfg.train_batch_size // (run.accelerator.num_processes * accumulation)
    params, optimizer = common.setup_lora(run, spec, cfg.lr, cfg.weight_decay, cfg.adapters, cfg.max_grad_norm,
                                          micro)
    exclude = cotrain.shared_parameters(run)
    cotrain.freeze(critic, exclude)
    critic_trainer = cotrain.build(run, exclude)
    edges = run.cotrain.sigma_edges if run.cotrain is not None else cotrain.CotrainConfig().sigma_edges
    want_values = critic.dense and (cfg.advantages == "dense" or critic_trainer is not None)
    start_epoch, history, _ = pg.start_run(run, optimizer, cfg.adapters, resume, critic_trainer,
                                           cfg.eval_adapter)

    consecutive_bad, epoch = 0, start_epoch - 1  # epoch: the last one done (a finished run resumed: start_epoch)
    with GracefulExit() as stop:
        for epoch in range(start_epoch, run.run_cfg.max_epochs):
            prompts = common.prompt_batch(run.train_prompts, cfg.prompts_per_epoch, epoch, run.run_cfg.seed)
            rows = [p for p in prompts for _ in range(cfg.group_size)]
            # 1-2. SDE rollout with log pi_old, realised reward R
            # (this process's slice of the rows; rewards, values and masks gathered for every row)
            rng, generator = pg.epoch_generator(run, epoch, 1)
            rollout = pg.collect(run, rows, cfg.num_steps, cfg.eta, cfg.guidance_scale, cfg.rollout_batch_size,
                                 cfg.sde_window, cfg.sde_window_start, rng, generator,
                                 distributed.process_generator(run.run_cfg.seed, epoch, 1, run.accelerator),
                                 cfg.group_size if cfg.group_noise else 1, cfg.sde_type)
            rewards = pg.gather(run, rollout.rewards, len(rows), cfg.rollout_batch_size)  # (B,)
            finite = torch.isfinite(rewards)
            metrics = {**pg.reward_metrics(rewards, cfg.group_size), "train/epoch": epoch + 1}
            # the steps the advantages are computed on and trained (values_at: trained: drawn per group now)
            sel = pg.advantage_steps(run, rollout, len(rows), cfg, epoch, cfg.group_size)
            # 2. V(z_k) along every trajectory (calibration logged before any update on these trajectories)
            values = None
            if want_values:
                values, calibration = pg.trajectory_values(run, critic, rollout, rewards, cfg, edges,
                                                           sel.asked)  # (B, N+1)
                metrics.update(calibration)
            if finite.all():
                # 3. advantages: sparse group-normalised R, or dense per-step from V
                adv = grpo_advantages(rewards, values, sel.mask, cfg)
                metrics["adv/abs_mean"] = adv[sel.mask].abs().mean().item()
                if values is not None and cfg.advantages == "dense" and cfg.dense_calibration == "batch":
                    metrics["adv/value_slope"] = calibration_slope(values, rewards, cfg.group_size)
                # 4. PPO-clip + KL on a fraction of the stochastic steps
                _, generator = pg.epoch_generator(run, epoch, 2)
                with run.timer("update"):
                    metrics.update(pg.ppo_update(run, rollout, adv[sel.mine], optimizer, params,
                                                 cfg.update_settings(epoch), generator, sel.steps))
                consecutive_bad = consecutive_bad + 1 if metrics["train/skipped_updates"] else 0
            else:
                metrics["train/skipped_updates"] = 1.0
                consecutive_bad += 1
            # 5. critic co-training on the policy's own trajectories
            if critic_trainer is not None:  # each process draws its own (row, step) pairs, as DRaFT's co-training
                generator = distributed.process_generator(run.run_cfg.seed, epoch, 3, run.accelerator)
                with run.timer("cotrain"):
                    metrics.update(critic_trainer.update(rollout.latents, rollout.sigmas, rollout.rewards,
                                                         rollout.prompts, generator))
            if consecutive_bad >= run.run_cfg.max_nonfinite:
                pg.save(run, epoch + 1, optimizer, cfg.adapters, {"history": history}, critic_trainer)
                raise NonFiniteError(f"{consecutive_bad} consecutive epochs with non-finite rewards, losses or "
                                     f"gradients (last epoch {epoch + 1}); lower algo.lr or check the reward/critic. "
                                     f"The last finite state is checkpointed in {run.run_dir}")
            # 6. evaluate, log, checkpoint
            if pg.end_epoch(run, epoch, metrics, optimizer, cfg.adapters, history, {}, stop, critic_trainer,
                            cfg.eval_adapter):
                break
    if common.stopped_by_signal(run, stop):
        return {}
    return pg.finish_run(run, epoch + 1, cfg.eval_adapter)
