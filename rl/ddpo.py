"""DDPO (Black et al., arXiv 2305.13301) for flow models, with dense per-step advantages from a value critic.

Denoising as a multi-step MDP, optimised by PPO on the per-step log-probs of the stochastic sampler (for flows:
the Flow-GRPO SDE step, policies/samplers.py). Each epoch:

1. Rollout. ``prompts_per_epoch`` prompts, ``group_size`` samples each, SDE at every step, keeping every latent
   and log pi_old(z_{k+1} | z_k). ``sde_window`` > 0 borrows Flow-GRPO-Fast's window (rl/grpo.py): SDE only in
   that many consecutive steps, ODE elsewhere, and only the window is trained.
2. Reward R = r(D(z_N)); with a value critic also V(z_k) along the trajectories.
3. Advantages (``advantages``):
     sparse  (DDPO Sec. 4.3)  A = (R - mu_prompt) / (sigma_prompt + 1e-6) from a per-prompt history buffer of the
                              last ``stat_buffer_size`` rewards of that prompt (batch statistics until it holds
                              ``stat_min_count``), the same for every step of a sample;
     dense   (critic)         A_k = GAE_lambda(delta)_k, delta_k = V(z_{k+1}) - V(z_k), V(z_N) := R, centred per
                              step (within each prompt's group when group_size >= 2, else over the batch) and
                              divided by that std (``dense_norm: group_step``, default) or the global one; by
                              default lambda = 1 (R - V(z_k)) on V calibrated by the batch (as in rl/grpo.py).
                              V(z_k) is a prompt- *and state*-dependent baseline, so it replaces the per-prompt
                              history (see rl/grpo.py for why it reduces variance). V is carried exactly across ODE
                              steps (``exact_ode``, as in rl/grpo.py).
   Both clipped to [-adv_clip, adv_clip].
4. ``inner_epochs`` passes of PPO-clip over (sample, step) pairs (DDPO Eq. 4, importance sampling):
     L = mean max(-A rho_k, -A clip(rho_k, 1 - eps, 1 + eps)),  rho_k = pi_theta / pi_old
   DDPO has no KL term (``kl_beta`` 0); ``kl_beta`` > 0 adds Flow-GRPO's KL to the reference policy (rl/grpo.py).
   Every pass reshuffles the samples and redraws each sample's ``timestep_fraction`` of steps; with
   ``values_at: trained`` they are drawn once, per group, before stage 2, and the critic is asked at their latents
   only (as in rl/grpo.py).
5. Critic co-training (``critic.cotrain``, rl/cotrain.py).
6. Log, evaluate, checkpoint (the history buffer is part of the checkpoint).

Notation: eps = ``clip_range``; pi_old = ``rollout.log_probs`` (B, N), averaged over latent elements.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from policies import lora
from rl import common, cotrain, distributed
from rl import policy_gradient as pg
from rl.advantages import calibration_slope, dense_advantages
from rl.checkpoint import NonFiniteError
from rl.config import check, option
from rl.grpo import check_critic
from rl.signals import GracefulExit

STAT_EPS = 1e-6  # ddpo-pytorch's std epsilon


@dataclass
class DDPOConfig(common.EMAAdapters):
    """DDPO hyper-parameters (ddpo-pytorch's defaults where they exist; Shapes sizes in configs/algo/ddpo.yaml)."""

    num_steps: int = option(10, help="sampler steps N")
    eta: float = option(0.7, help="SDE noise level; must be > 0 (an ODE step has no log-prob)")
    sde_type: Literal["flow", "cps"] = option("flow", help=pg.SDE_TYPE_HELP)
    guidance_scale: float = option(1.0, help="CFG weight in rollout and training (1.0 = CFG-free)")
    sde_window: int = option(0, help="stochastic steps only in a window of this many steps, ODE elsewhere "
                                     "(Flow-GRPO-Fast's window; 0 = SDE at every step, DDPO)")
    sde_window_start: tuple[int, int] = option((0, 0), help="(lo, hi): the window starts at step U{lo..hi}")
    prompts_per_epoch: int = option(16, help="prompts per epoch")
    group_size: int = option(1, help="samples per prompt (DDPO: 1; the history buffer supplies the prompt's mean)")
    group_noise: bool = option(False, help="a group's samples share their initial noise z_T (DanceGRPO), so the "
                                            "rewards within a group differ only through the SDE steps (group_size >= 2)")
    rollout_batch_size: int = option(32, help="samples per rollout forward (a multiple of group_size)")
    train_batch_size: int = option(16, help="samples per optimizer step")
    value_batch_size: int = option(64, help="latents per critic call (dense values)")
    timestep_fraction: float = option(1.0, help="fraction of each sample's steps trained on per inner epoch")
    inner_epochs: int = option(2, help="PPO passes over each batch of samples (importance-sampled)")
    clip_range: float = option(1e-4, help="eps of the ratio clip (ddpo-pytorch: 1e-4). With inner_epochs >= 2 "
                                          "watch policy/clipfrac_pass2: near 1, the later passes are mostly "
                                          "clipped (the Shapes GPU config uses 1e-3)")
    adv_clip: float = option(5.0, help="advantages clipped to [-adv_clip, adv_clip] (ddpo-pytorch: 5)")
    per_prompt_stats: bool = option(True, help="sparse: normalise by per-prompt history statistics (else batch)")
    stat_buffer_size: int = option(32, help="rewards kept per prompt in the history buffer")
    stat_min_count: int = option(16, help="use a prompt's own statistics once its buffer holds this many rewards")
    advantages: Literal["sparse", "dense"] = option(
        "sparse", help="sparse: normalised R shared by every step; dense: per-step GAE on the critic's V")
    gae_lambda: float = option(1.0, help="dense: lambda of GAE (0: V(z_k+1) - V(z_k); 1: R - V(z_k))")
    dense_norm: Literal["global", "group_step", "none"] = option(
        "group_step", help="dense: after centring per step divide by the global std, the per-step std, or nothing")
    exact_ode: bool = option(True, help=pg.EXACT_ODE_HELP)
    values_at: Literal["stochastic", "trained"] = option("stochastic", help=pg.VALUES_AT_HELP + "; with group_size "
                                                         "1 the whole batch shares one draw")
    dense_calibration: Literal["none", "batch"] = option("batch", help=pg.DENSE_CALIBRATION_HELP)
    adv_eps: float = option(1e-4, help="dense: eps added to the std")
    kl_beta: float = option(0.0, help="weight of Flow-GRPO's KL to the reference (adapters off); DDPO has none (0), "
                                      "> 0 anchors a long run")
    lr: float = option(3e-4, help="AdamW learning rate of the LoRA (ddpo-pytorch: 3e-4)")
    weight_decay: float = option(1e-4, help="AdamW weight decay")
    max_grad_norm: float = option(1.0, help="gradient clipping")
    ema_decay: float = option(0.0, help="EMA of the LoRA (adapter 'ema', warm-up min(decay, (1+s)/(10+s)) at optimizer "
                                        "step s), the one evaluated, validated and exported; 0 = off, the trained one")
    lora_rank: int = option(32, help="LoRA rank r")
    lora_alpha: float = option(64.0, help="LoRA alpha")
    lora_targets: tuple[str, ...] = option(lora.SD3_TARGETS, help="LoRA target modules")

    def __post_init__(self):
        check(self.num_steps >= 1, "num_steps", f"must be >= 1, got {self.num_steps}")
        check(self.eta > 0, "eta", f"DDPO needs a stochastic sampler (eta > 0): the deterministic ODE step "
                                   f"(eta = 0) has no log-probability; got {self.eta}")
        for key in ("prompts_per_epoch", "group_size", "rollout_batch_size", "train_batch_size", "value_batch_size",
                    "inner_epochs", "stat_buffer_size", "stat_min_count"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.rollout_batch_size % self.group_size == 0, "rollout_batch_size",
              f"must be a multiple of group_size ({self.group_size}), got {self.rollout_batch_size}")
        pg.check_window(self.num_steps, self.sde_window, self.sde_window_start)
        pg.check_sde(self)
        rounds = -(-self.prompts_per_epoch * self.group_size // self.rollout_batch_size)  # each draws its window
        if self.advantages == "dense" and self.group_size < 2 and self.sde_window:
            lo, hi = self.sde_window_start
            check(lo == hi or rounds == 1, "sde_window",
                  f"dense advantages with group_size 1 are centred per step over the whole batch, whose {rounds} "
                  f"rollout rounds draw different windows: use one round (rollout_batch_size >= prompts_per_epoch * "
                  f"group_size), group_size >= 2 or a fixed window start (sde_window_start [k, k])")
        check(self.advantages != "dense" or self.dense_calibration != "batch"
              or self.prompts_per_epoch * self.group_size >= 2, "dense_calibration",
              f"'batch' fits the slope of R on V over an epoch's samples, which needs >= 2 "
              f"(prompts_per_epoch * group_size = {self.prompts_per_epoch * self.group_size}): sample more or set "
              f"algo.dense_calibration=none")
        check(0 < self.timestep_fraction <= 1, "timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")
        check(self.clip_range > 0, "clip_range", f"must be > 0, got {self.clip_range}")
        check(self.adv_clip > 0, "adv_clip", f"must be > 0, got {self.adv_clip}")
        check(self.adv_eps > 0, "adv_eps", f"must be > 0, got {self.adv_eps}")
        check(not self.group_noise or self.group_size >= 2, "group_noise",
              f"shares z_T within a prompt's group: set algo.group_size >= 2 or algo.group_noise=false (got "
              f"group_size {self.group_size})")
        check(self.kl_beta >= 0, "kl_beta", f"must be >= 0, got {self.kl_beta}")
        check(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        check(0 <= self.gae_lambda <= 1, "gae_lambda", f"must be in [0, 1], got {self.gae_lambda}")
        check(self.stat_min_count <= self.stat_buffer_size, "stat_min_count",
              f"must be <= stat_buffer_size ({self.stat_buffer_size}), got {self.stat_min_count}")
        pg.check_values_at(self)
        common.check_optimizer_and_lora(self)

    def update_settings(self, epoch: int) -> pg.UpdateSettings:
        per_epoch = pg.steps_per_epoch(self.prompts_per_epoch * self.group_size, self.train_batch_size, self.inner_epochs)
        return pg.UpdateSettings(self.eta, self.guidance_scale, self.clip_range, self.kl_beta, self.train_batch_size,
                                 self.timestep_fraction, self.inner_epochs, self.max_grad_norm, self.ema_decay,
                                 epoch * per_epoch)


# ------------------------------------------------------------------------------------------------ advantages
class PerPromptStatTracker:
    """DDPO's per-prompt reward normalisation with a history buffer (ddpo-pytorch's PerPromptStatTracker).

    ``update`` appends the batch's rewards to each prompt's buffer (the last ``buffer_size`` kept), then
    A = (R - mean) / (std + 1e-6) with the prompt's buffer statistics once it holds ``min_count`` rewards, the
    batch's before that.
    """

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """prompts (B,), rewards (B,) -> advantages (B,) float32 on the rewards' device."""
        r = rewards.detach().float().cpu().numpy()
        names = np.array(prompts, dtype=object)
        adv = np.empty_like(r)
        for prompt in dict.fromkeys(prompts):
            rows = names == prompt
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(r[rows].tolist())
            ref = np.asarray(buffer) if len(buffer) >= self.min_count else r
            adv[rows] = (r[rows] - ref.mean()) / (ref.std() + STAT_EPS)
        return torch.as_tensor(adv, device=rewards.device)

    def state(self) -> dict[str, list[float]]:
        return {p: list(b) for p, b in self.stats.items()}

    def load(self, state: dict[str, list[float]]) -> None:
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state.items()}


def ddpo_advantages(rewards: Tensor, values: Tensor | None, sde_mask: Tensor, prompts: list[str],
                    tracker: PerPromptStatTracker, cfg: DDPOConfig) -> Tensor:
    """Stage 3: per-step advantages (B, N) (module docstring). The sparse path updates the history buffer."""
    if cfg.advantages == "sparse":
        if cfg.per_prompt_stats:
            adv = tracker.update(prompts, rewards)
        else:
            adv = (rewards.float() - rewards.float().mean()) / (rewards.float().std(unbiased=False) + STAT_EPS)
        adv = adv.view(-1, 1).expand_as(sde_mask)
    else:
        if values is None:
            raise ValueError("dense advantages need the critic's values along the trajectories")
        groups = cfg.group_size if cfg.group_size >= 2 else rewards.shape[0]
        adv = dense_advantages(values, rewards, sde_mask, cfg.gae_lambda, groups, cfg.dense_norm, cfg.adv_eps,
                               cfg.exact_ode, cfg.dense_calibration == "batch")
    return torch.where(sde_mask, adv.clamp(-cfg.adv_clip, cfg.adv_clip), torch.zeros_like(adv))


# ------------------------------------------------------------------------------------------------ the loop
def train(run: common.Run, cfg: DDPOConfig, resume: str | None = None) -> dict[str, float]:
    """DDPO. Returns the final evaluation metrics."""
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
    tracker = PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)
    start_epoch, history, state = pg.start_run(run, optimizer, cfg.adapters, resume, critic_trainer,
                                               cfg.eval_adapter)
    tracker.load(state.get("stat_tracker", {}))

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
            # the steps the advantages are computed on and trained (values_at: trained: drawn per group now,
            # one draw for the batch at group_size 1, where dense advantages are centred over the batch)
            sel = pg.advantage_steps(run, rollout, len(rows), cfg, epoch,
                                     cfg.group_size if cfg.group_size >= 2 else len(rows))
            # 2. V(z_k) along every trajectory (calibration before any update on these trajectories)
            values = None
            if want_values:
                values, calibration = pg.trajectory_values(run, critic, rollout, rewards, cfg, edges,
                                                           sel.asked)  # (B, N+1)
                metrics.update(calibration)
            if finite.all():
                # 3. advantages: per-prompt history (sparse) or per-step from V (dense)
                adv = ddpo_advantages(rewards, values, sel.mask, rows, tracker, cfg)
                metrics["adv/abs_mean"] = adv[sel.mask].abs().mean().item()
                if values is not None and cfg.advantages == "dense" and cfg.dense_calibration == "batch":
                    metrics["adv/value_slope"] = calibration_slope(values, rewards, cfg.group_size)
                # 4. inner epochs of PPO-clip with importance sampling
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
            extra = {"stat_tracker": tracker.state()}
            if consecutive_bad >= run.run_cfg.max_nonfinite:
                pg.save(run, epoch + 1, optimizer, cfg.adapters, {"history": history, **extra}, critic_trainer)
                raise NonFiniteError(f"{consecutive_bad} consecutive epochs with non-finite rewards, losses or "
                                     f"gradients (last epoch {epoch + 1}); lower algo.lr or check the reward/critic. "
                                     f"The last finite state is checkpointed in {run.run_dir}")
            # 6. evaluate, log, checkpoint
            if pg.end_epoch(run, epoch, metrics, optimizer, cfg.adapters, history, extra, stop, critic_trainer,
                            cfg.eval_adapter):
                break
    if common.stopped_by_signal(run, stop):
        return {}
    return pg.finish_run(run, epoch + 1, cfg.eval_adapter)
