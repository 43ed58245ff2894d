"""DiffusionNFT (Zheng et al., arXiv 2509.16117), with the StitchVM early-stop variant (StitchVM Eqs. 72-77).

Online RL by *forward* flow matching: no log-probs, any solver, CFG-free. Each epoch:

1. Rollout. The data-collection ("old") policy theta_old samples G images per prompt with the ODE sampler.
   With a value critic the rollout stops at tau ~ U{tau_min..tau_max} and keeps z_tau (no finishing, no
   decode); with ``terminal`` it finishes (tau = N, z_tau = z_0).
2. Reward. R = V(z_tau) from the critic (``terminal``: r(D(z_0))).
3. Optimality probability. A = (R - mean_group R) / (std + eps); r = 1/2 + 1/2 clip(A, -C, C) / C (Eq. 73).
4. Forward regression re-anchored at z_tau (Eqs. 74-76): for t > sigma_tau,
       z_t = abar z_tau + sbar eps,  abar = alpha_t / alpha_tau = (1 - t) / (1 - sigma_tau),
       sbar = sqrt(t^2 - abar^2 sigma_tau^2),
       u = d z_t / dt = abar' z_tau + sbar' eps,  abar' = -1 / (1 - sigma_tau),  sbar' = (t - abar abar' sigma_tau^2) / sbar.
   For sigma_tau = 0 this is the usual z_t = (1 - t) x_0 + t eps, u = eps - x_0.
   Implicit policies (Eq. 77): v+ = (1 - beta) v_old + beta v_theta,  v- = (1 + beta) v_old - beta v_theta,
       L = E[ r ||v+ - u||^2 + (1 - r) ||v- - u||^2 ] + beta_KL ||v_theta - v_ref||^2.
5. Old policy by EMA: theta_old <- rho theta_old + (1 - rho) theta, rho ramping up over epochs.

Notation: ``nft_beta`` is beta (the implicit-policy step, Eq. 77); ``kl_beta`` is beta_KL (the weight of the
anchor to the reference = adapters disabled). They are different knobs: NFT-beta shapes the update direction,
KL-beta keeps the policy near theta_0.

    symbol     here
    z_tau      rollout.z_tau            (B, C, h, w)
    sigma_tau  rollout.sigma_tau        (B,)
    r          r_opt                    (B,) in [0, 1]
    u          target                   (B, C, h, w)
    v_theta    v_theta (adapter "default"), v_old (adapter "old"), v_ref (adapters off)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from policies import lora, samplers
from rl import common, distributed, selection
from rl.advantages import group_normalize, optimality_probability
from rl.checkpoint import NonFiniteError
from rl.config import ConfigError, check, option
from rl.signals import GracefulExit

ADAPTERS = ("default", "old")


@dataclass
class NFTConfig:
    """DiffusionNFT hyper-parameters (paper defaults where the paper gives them)."""

    num_steps: int = option(25, help="rollout sampler steps N (paper: 25)")
    tau_min: int = option(12, help="earliest early stop tau with a value critic (paper: 12 of 25)")
    tau_max: int = option(17, help="latest early stop tau with a value critic (paper: 17 of 25)")
    prompts_per_epoch: int = option(16, help="prompts sampled per epoch")
    group_size: int = option(8, help="G, samples per prompt (group normalisation needs >= 2)")
    rollout_batch_size: int = option(32, help="latents per rollout forward pass")
    train_batch_size: int = option(16, help="samples per optimisation micro-batch")
    timestep_fraction: float = option(0.9, help="fraction of the rollout's timesteps above sigma_tau trained on")
    max_train_timesteps: int | None = option(None, help="cap on trained timesteps per sample (CPU budgets)")
    group_noise: bool = option(False, help="common random numbers: a group's samples share their minibatch, "
                                           "timesteps t and noise eps (a variance reduction; optimise's docstring)")
    inner_epochs: int = option(1, help="passes over each epoch's samples")
    nft_beta: float = option(1.0, help="beta: implicit-policy step v+- = (1 -+ beta) v_old +- beta v_theta (Eq. 77)")
    kl_beta: float = option(1e-4, help="beta_KL: weight of ||v_theta - v_ref||^2, v_ref = adapters disabled")
    adv_clip: float = option(5.0, help="C: advantages clipped to [-C, C] before r = 1/2 + A / (2C)")
    adv_eps: float = option(1e-4, help="eps in A = (R - mean) / (std + eps)")
    global_std: bool = option(False, help="normalise by the batch std instead of the group's")
    lr: float = option(3e-4, help="AdamW learning rate of the LoRA")
    weight_decay: float = option(1e-4, help="AdamW weight decay")
    max_grad_norm: float = option(1.0, help="gradient clipping")
    lora_rank: int = option(32, help="LoRA rank r")
    lora_alpha: float = option(64.0, help="LoRA alpha")
    lora_targets: tuple[str, ...] = option(lora.SD3_TARGETS, help="LoRA target modules")
    old_decay_max: float = option(0.5, help="rho's ceiling in theta_old <- rho theta_old + (1 - rho) theta")
    old_decay_ramp: float = option(0.05, help="rho = min(old_decay_max, old_decay_ramp * epoch)")
    rollout_guidance_scale: float = option(1.0, help="CFG at rollout (DiffusionNFT: 1.0, CFG-free)")

    def __post_init__(self):
        check(self.num_steps >= 2, "num_steps", f"must be >= 2, got {self.num_steps}")
        check(1 <= self.tau_min <= self.tau_max <= self.num_steps, "tau_min/tau_max",
              f"need 1 <= tau_min <= tau_max <= num_steps ({self.num_steps}), got {self.tau_min}..{self.tau_max}")
        check(self.group_size >= 2, "group_size", f"group normalisation needs >= 2 samples per prompt, got "
              f"{self.group_size}")
        check(0 < self.timestep_fraction <= 1, "timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")
        check(self.max_train_timesteps is None or self.max_train_timesteps >= 1, "max_train_timesteps",
              f"must be >= 1 (or null: no cap), got {self.max_train_timesteps}")
        check(self.nft_beta > 0, "nft_beta", f"must be > 0, got {self.nft_beta}")
        check(self.kl_beta >= 0, "kl_beta", f"must be >= 0, got {self.kl_beta}")
        check(self.adv_clip > 0, "adv_clip", f"C must be > 0 (r = 1/2 + A / (2C)), got {self.adv_clip}")
        check(self.adv_eps > 0, "adv_eps", f"must be > 0 (a group of equal rewards has std 0), got {self.adv_eps}")
        check(0 <= self.old_decay_max <= 1, "old_decay_max", f"must be in [0, 1], got {self.old_decay_max}")
        check(self.old_decay_ramp >= 0, "old_decay_ramp", f"must be >= 0, got {self.old_decay_ramp}")
        common.check_optimizer_and_lora(self)
        for key in ("prompts_per_epoch", "rollout_batch_size", "train_batch_size", "inner_epochs"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        # group_noise's variance reduction is the cancellation of the shared eps over a whole group (optimise)
        check(not self.group_noise or self.train_batch_size % self.group_size == 0, "group_noise",
              f"shares (t, eps) within a group, which cancels only over whole groups: make train_batch_size "
              f"({self.train_batch_size}) a multiple of group_size ({self.group_size}) or set group_noise false")
        # one stop step tau per rollout round: a group split unevenly across rounds would be normalised over values
        # at different noise levels. Rounds hold whole groups, or a group spans whole rounds (which then share its tau).
        check(self.rollout_batch_size % self.group_size == 0 or self.group_size % self.rollout_batch_size == 0,
              "rollout_batch_size", f"must be a multiple or a divisor of group_size ({self.group_size}) so that every "
              f"group is valued at one tau; got {self.rollout_batch_size}")


# ------------------------------------------------------------------------------------------------ pure math
class ReanchoredPath(NamedTuple):
    z_t: Tensor     # (B, C, h, w)
    target: Tensor  # (B, C, h, w), u = dz_t/dt


def reanchored_path(z_tau: Tensor, sigma_tau: Tensor, t: Tensor, eps: Tensor) -> ReanchoredPath:
    """Forward process from z_tau (at noise sigma_tau) to t > sigma_tau and its time derivative (Eqs. 74-76).

    Args:
        z_tau: (B, C, h, w) early-stopped latents (z_0 when sigma_tau = 0).
        sigma_tau: (B,) their noise levels, in [0, 1).
        t: (B,) target noise levels, t > sigma_tau.
        eps: (B, C, h, w) fresh Gaussian noise.
    """
    if (t <= sigma_tau).any():
        raise ValueError("re-anchored regression needs t > sigma_tau for every row")
    s_tau, t_ = sigma_tau.double().view(-1, 1, 1, 1), t.double().view(-1, 1, 1, 1)
    abar = (1 - t_) / (1 - s_tau)
    sbar = torch.sqrt(t_**2 - abar**2 * s_tau**2)
    dabar = -1 / (1 - s_tau)
    dsbar = (t_ - abar * dabar * s_tau**2) / sbar
    z_t = abar * z_tau.double() + sbar * eps.double()
    target = dabar * z_tau.double() + dsbar * eps.double()
    return ReanchoredPath(z_t.to(z_tau.dtype), target.float())


class NFTLoss(NamedTuple):
    loss: Tensor         # scalar
    policy_loss: Tensor  # scalar, E[r ||v+ - u||^2 + (1 - r) ||v- - u||^2]
    kl: Tensor           # scalar, ||v_theta - v_ref||^2 (0 when no reference is given)


def nft_loss(v_theta: Tensor, v_old: Tensor, target: Tensor, r_opt: Tensor, nft_beta: float,
             v_ref: Tensor | None = None, kl_beta: float = 0.0) -> NFTLoss:
    """DiffusionNFT's loss (Eq. 77), squared errors averaged over latent elements, then over the batch.

    Args:
        v_theta: (B, C, h, w) velocity of the trained policy (with grad).
        v_old: (B, C, h, w) velocity of the data-collection policy (no grad).
        target: (B, C, h, w) regression target u.
        r_opt: (B,) optimality probabilities in [0, 1].
        nft_beta: beta of the implicit policies.
        v_ref: (B, C, h, w) reference velocity (adapters off), or None to skip the KL term.
        kl_beta: beta_KL.
    """
    v_theta, v_old, target = v_theta.float(), v_old.float().detach(), target.float()
    v_pos = (1 - nft_beta) * v_old + nft_beta * v_theta
    v_neg = (1 + nft_beta) * v_old - nft_beta * v_theta
    dims = tuple(range(1, v_theta.ndim))
    err_pos = ((v_pos - target) ** 2).mean(dims)
    err_neg = ((v_neg - target) ** 2).mean(dims)
    r = r_opt.float()
    policy_loss = (r * err_pos + (1 - r) * err_neg).mean()
    kl = ((v_theta - v_ref.float().detach()) ** 2).mean() if v_ref is not None else torch.zeros((), device=v_theta.device)
    return NFTLoss(policy_loss + kl_beta * kl, policy_loss, kl)


def group_permutation(n: int, unit: int, generator: torch.Generator) -> Tensor:
    """A random order of n rows that keeps each block of ``unit`` consecutive rows (a group) together, in order."""
    blocks = torch.randperm(n // unit, generator=generator, device=generator.device)
    return (blocks[:, None] * unit + torch.arange(unit, device=blocks.device)).flatten()


def first_of_group(idx: Tensor, unit: int) -> Tensor:
    """For rows ``idx`` (global indices, groups of ``unit`` consecutive rows), the position in ``idx`` of the first
    row of each one's group: indexing per-row draws with it makes a group share them (common random numbers)."""
    group = (idx // unit).tolist()
    first: dict[int, int] = {}
    return torch.tensor([first.setdefault(g, k) for k, g in enumerate(group)], device=idx.device)


def old_decay(cfg: NFTConfig, epoch: int) -> float:
    """rho for the EMA of the old policy after ``epoch`` (0-based): 0 at first (theta_old = theta), ramping up."""
    return min(cfg.old_decay_max, cfg.old_decay_ramp * epoch)


# ------------------------------------------------------------------------------------------------ stages
class Rollout(NamedTuple):
    prompts: list[str]       # B prompts (each prompt G times in a row)
    z_tau: Tensor            # (B, C, h, w)
    sigma_tau: Tensor        # (B,)
    train_sigmas: Tensor     # (B, K) the schedule's sigmas above sigma_tau to train on (padded by repeats)
    rewards: Tensor          # (B,)
    num_sigmas: Tensor       # (B,) long: tau of the row, i.e. its first num_sigmas columns are its distinct sigmas


@torch.no_grad()
def collect(run: common.Run, cfg: NFTConfig, prompts: list[str], epoch: int) -> Rollout:
    """Stages 1-2: sample with theta_old (stopping at tau with a value critic) and score z_tau.

    The epoch's rows (each prompt G times) go in rounds of ``rollout_batch_size`` with one tau per round (a round
    shares its schedule, so it is one forward per process). With several processes each samples its slice of every
    round (the round's noise is drawn whole, as on one process) and the rollout is gathered: every process returns
    the whole epoch batch, in the row order of a single process (rl.distributed)."""
    policy, critic, accel = run.policy, run.critic, run.accelerator
    rng = np.random.default_rng([run.run_cfg.seed, epoch, 1])
    generator = torch.Generator(run.device).manual_seed(int(rng.integers(2**31)))
    sigmas = policy.sigmas(cfg.num_steps, run.device)
    rows = [p for p in prompts for _ in range(cfg.group_size)]
    starts = range(0, len(rows), cfg.rollout_batch_size)
    if cfg.group_size > cfg.rollout_batch_size:  # a group spans several rounds: they share the group's tau
        group_taus = [int(rng.integers(cfg.tau_min, cfg.tau_max + 1)) for _ in range(len(prompts))]
        taus = [group_taus[start // cfg.group_size] if critic.dense else cfg.num_steps for start in starts]
    else:  # a round holds whole groups
        taus = [int(rng.integers(cfg.tau_min, cfg.tau_max + 1)) if critic.dense else cfg.num_steps for _ in starts]
    k = max(taus)
    local: dict[str, list[Tensor]] = {"z_tau": [], "sigma_tau": [], "train_sigmas": [], "rewards": [],
                                      "num_sigmas": []}
    index = []
    for start, tau in zip(starts, taus):
        chunk = rows[start:start + cfg.rollout_batch_size]
        z_T = policy.noise(len(chunk), generator)  # the whole round's noise, on every process
        mine = distributed.process_slice(len(chunk), accel)
        batch = chunk[mine]
        with run.timer("rollout"), lora.using_adapter(policy.transformer, "old"):
            cond = policy.encode_prompts(batch)
            traj = samplers.sample(policy.velocity_fn(cond, cfg.rollout_guidance_scale), z_T[mine], sigmas,
                                   stop_at=tau, keep_latents=False)
        with run.timer("value"):
            local["rewards"].append(critic.value(traj.z_tau, sigmas[tau], batch).float())
        local["z_tau"].append(traj.z_tau)
        local["sigma_tau"].append(sigmas[tau].expand(len(batch)))
        # each row's trainable sigmas, cycled to k columns so rows stack; rows only ever draw from their own
        local["train_sigmas"].append(sigmas[:tau].repeat(math.ceil(k / tau))[:k].expand(len(batch), -1))
        local["num_sigmas"].append(torch.full((len(batch),), tau, dtype=torch.long, device=run.device))
        index += range(start + mine.start, start + mine.stop)
    full = {key: distributed.gather_rows(accel, torch.cat(parts), index, len(rows)) for key, parts in local.items()}
    return Rollout(rows, full["z_tau"], full["sigma_tau"], full["train_sigmas"], full["rewards"], full["num_sigmas"])


def draw_columns(num_sigmas: Tensor, k: int, num_t: int, generator: torch.Generator) -> Tensor:
    """(b, num_t) distinct columns per row, uniform among the row's first num_sigmas[row] (<= k) columns."""
    device = generator.device
    if bool((num_sigmas == k).all()):  # one tau for all: the draws every recorded run made
        return torch.stack([torch.randperm(k, generator=generator, device=device)[:num_t]
                            for _ in range(len(num_sigmas))])
    keys = torch.rand((len(num_sigmas), k), generator=generator, device=device)
    keys = keys.masked_fill(torch.arange(k, device=device) >= num_sigmas.to(device)[:, None], 2.0)  # padding last
    return keys.argsort(dim=1)[:, :num_t]


def optimise(run: common.Run, cfg: NFTConfig, rollout: Rollout, r_opt: Tensor, optimizer, params,
             epoch: int) -> dict[str, float]:
    """Stage 4: forward regression on (z_tau, r) at a random subset of the rollout's timesteps.

    Every process draws the same minibatches, timesteps and noise for the whole (gathered) epoch batch and trains
    on its slice of each minibatch, in ``run.gradient_accumulation_steps`` micro-batches (rl.distributed); each
    backward pass is one (micro-batch, timestep). The logged losses are means over the global minibatch.

    ``group_noise`` (common random numbers, ours): minibatches hold whole groups and a group's samples share t and
    eps. At v_theta = v_old the gradient is sum_i (2 r_i - 1)(v_old,i - u_i) dv_i/dtheta, and (2 r_i - 1) sums to
    ~0 over a group (group-normalised); the eps-part of the target u_i, the largest term, is then common to the
    group and cancels instead of adding noise. Each row's (t, eps) is still marginally the same law, so the
    expected gradient is unchanged. Off in this dataclass (the reference behaviour; every recorded GPU figure), on in
    configs/algo/nft.yaml, the CPU default: at its 64-sample epochs it measured +0.033 against +0.014 without after
    50 epochs (one seed each, 512 held-out prompts; docs/bench/nft_cpu_session3.md)."""
    policy, accel = run.policy, run.accelerator
    transformer = policy.transformer
    generator = torch.Generator(run.device).manual_seed(int(np.random.default_rng([run.run_cfg.seed, epoch, 2])
                                                            .integers(2**31)))
    n = rollout.z_tau.shape[0]
    # rounds of one epoch may stop at different tau: every row trains on num_t of its own distinct sigmas (the
    # fraction of the epoch's smallest tau), not on k padded columns, where repeats would double-weight high noise
    shortest = int(rollout.num_sigmas.min())
    num_t = max(1, round(cfg.timestep_fraction * shortest))
    if cfg.max_train_timesteps is not None:
        num_t = min(num_t, cfg.max_train_timesteps)
    loss_sums, norms, skipped = [], [], 0  # loss_sums: per optimizer step (num_t, 3) [total, policy, kl]
    unit = cfg.group_size if cfg.group_noise else 1  # rows that stay together (and share t, eps)
    for _ in range(cfg.inner_epochs):
        perm = group_permutation(n, unit, generator)
        for start in range(0, n, cfg.train_batch_size):
            idx = perm[start:start + cfg.train_batch_size]  # the optimizer step's global rows
            t_cols = draw_columns(rollout.num_sigmas[idx], rollout.train_sigmas.shape[1], num_t, generator)
            eps = [torch.randn((len(idx), *rollout.z_tau.shape[1:]), generator=generator, device=run.device,
                               dtype=torch.float32) for _ in range(num_t)]
            if unit > 1:  # every row takes the draws of its group's first row in this minibatch
                src = first_of_group(idx, unit)
                t_cols, eps = t_cols[src], [e[src] for e in eps]
            mine = distributed.process_slice(len(idx), accel)
            micros = distributed.micro_batches(len(idx[mine]), run.run_cfg.gradient_accumulation_steps)
            # logged sums stay on the device: an .item() per pass would make the host wait for every forward/backward
            sums = torch.zeros(num_t, 3, dtype=torch.float64, device=run.device)
            optimizer.zero_grad(set_to_none=True)
            finite = True
            for m, micro in enumerate(micros):
                rows, cols = idx[mine][micro], t_cols[mine][micro]
                share = distributed.loss_weight(len(rows), len(idx), accel)
                with torch.no_grad():
                    cond = policy.encode_prompts([rollout.prompts[i] for i in rows.tolist()])
                z_tau, s_tau = rollout.z_tau[rows], rollout.sigma_tau[rows]
                for j in range(num_t):
                    t = rollout.train_sigmas[rows].gather(1, cols[:, j:j + 1]).squeeze(1)
                    path = reanchored_path(z_tau, s_tau, t, eps[j][mine][micro].to(z_tau.dtype))
                    with distributed.gradient_sync(accel, run.trained_module, m == len(micros) - 1 and j == num_t - 1):
                        with torch.no_grad():
                            with lora.using_adapter(transformer, "old"):
                                v_old = policy.velocity(path.z_t, t, cond)
                            v_ref = None
                            if cfg.kl_beta > 0:
                                with lora.reference_policy(transformer):
                                    v_ref = policy.velocity(path.z_t, t, cond)
                        with accel.autocast():
                            v_theta = policy.velocity(path.z_t, t, cond)
                        out = nft_loss(v_theta, v_old, path.target, r_opt[rows], cfg.nft_beta, v_ref, cfg.kl_beta)
                        finite = distributed.backward(accel, out.loss * share / num_t) & finite
                    sums[j] += torch.stack([v.detach().to(torch.float64) for v in (out.loss, out.policy_loss,
                                                                                     out.kl)]) * len(rows)
            norm, stepped = common.clipped_step(accel, optimizer, params, cfg.max_grad_norm, finite)
            loss_sums.append(sums / len(idx))
            norms.append(norm)
            skipped += not stepped
    losses = distributed.sum_over_processes(accel, torch.stack(loss_sums)).flatten(0, 1).cpu()  # (steps*num_t, 3)
    out = {k: float(np.nanmean(losses[:, i].numpy())) for i, k in enumerate(("loss/total", "loss/policy", "loss/kl"))}
    out["policy/grad_norm"] = float(np.nanmean(norms))
    out["train/skipped_updates"] = float(skipped)
    return out


# ------------------------------------------------------------------------------------------------ the loop
def setup_policy(run: common.Run, cfg: NFTConfig) -> tuple[torch.optim.Optimizer, list]:
    """Adapters "default" (theta, trained) and "old" (theta_old = theta at start), the optimizer, accelerate.
    The global batch sizes must split over the processes (rl.distributed.check_layout)."""
    accumulation = run.run_cfg.gradient_accumulation_steps
    distributed.check_layout(run.accelerator, accumulation, cfg.prompts_per_epoch * cfg.group_size,
                             cfg.train_batch_size, cfg.rollout_batch_size)
    spec = lora.LoraSpec(r=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets)
    micro = cfg.train_batch_size // (run.accelerator.num_processes * accumulation)
    params, optimizer = common.setup_lora(run, spec, cfg.lr, cfg.weight_decay, ADAPTERS, cfg.max_grad_norm, micro)
    return optimizer, params


def train(run: common.Run, cfg: NFTConfig, resume: str | None = None) -> dict[str, float]:
    """DiffusionNFT. Returns the final evaluation metrics."""
    policy, critic = run.policy, run.critic
    if critic.dense and cfg.tau_max >= cfg.num_steps and cfg.tau_min >= cfg.num_steps:
        raise ConfigError("algo.tau_min/tau_max: a value critic needs an early stop tau < num_steps")
    transformer = policy.transformer
    optimizer, params = setup_policy(run, cfg)
    start_epoch, history = 0, []
    if resume:
        start_epoch, state = common.restore(run, resume, optimizer, ADAPTERS)
        history = state.get("history", [])
        common.print_resumed(run, start_epoch)
        selection.on_resume(run, start_epoch)
    else:
        metrics, images = common.evaluate(run)
        metrics.update(selection.on_evaluation(run, 0))
        run.logger.log({**metrics, "train/epoch": 0}, 0)
        common.print_epoch(run, 0, metrics)
        if images.numel():
            run.logger.log_images("eval/samples", images, 0)
        history.append(metrics)
    run.timer.reset()  # start-up (evaluation, validation, restore) is not charged to the first epoch's time/*

    consecutive_bad = 0
    epoch = start_epoch - 1  # the last epoch done: a resumed, finished run finishes at start_epoch
    with GracefulExit() as stop:
        for epoch in range(start_epoch, run.run_cfg.max_epochs):
            prompts = common.prompt_batch(run.train_prompts, cfg.prompts_per_epoch, epoch, run.run_cfg.seed)
            # 1-2. rollout with theta_old and reward R = V(z_tau)
            rollout = collect(run, cfg, prompts, epoch)
            finite = torch.isfinite(rollout.rewards)
            # 3. optimality probability from group-normalised rewards
            rewards = torch.where(finite, rollout.rewards, torch.zeros_like(rollout.rewards))
            adv = group_normalize(rewards, cfg.group_size, cfg.adv_eps, cfg.global_std).adv
            r_opt = optimality_probability(adv, cfg.adv_clip)
            metrics = {**common.log_mean_std("reward", rollout.rewards), "train/epoch": epoch + 1,
                       "reward/nonfinite": float((~finite).sum()), "train/sigma_tau": rollout.sigma_tau.mean().item()}
            if not finite.all():
                metrics["train/skipped_updates"] = 1.0
                consecutive_bad += 1
            else:
                # 4. forward regression with implicit positive / negative policies
                with run.timer("update"):
                    metrics.update(optimise(run, cfg, rollout, r_opt, optimizer, params, epoch))
                consecutive_bad = consecutive_bad + 1 if metrics["train/skipped_updates"] else 0
                # 5. theta_old <- rho theta_old + (1 - rho) theta
                lora.ema_update(transformer, "default", "old", old_decay(cfg, epoch))
            if consecutive_bad >= run.run_cfg.max_nonfinite:
                common.save(run, epoch + 1, optimizer, ADAPTERS, {"history": history})
                raise NonFiniteError(f"{consecutive_bad} consecutive epochs with non-finite rewards, losses or "
                                     f"gradients (last epoch {epoch + 1}); lower algo.lr or check the reward/critic. "
                                     f"The last finite state is checkpointed in {run.run_dir}")
            if run.run_cfg.eval_every and (epoch + 1) % run.run_cfg.eval_every == 0:
                with run.timer("eval"):
                    eval_metrics, images = common.held_out(run, epoch + 1)
                metrics.update(eval_metrics)
                history.append(eval_metrics)
                if images.numel():
                    run.logger.log_images("eval/samples", images, epoch + 1)
                metrics.update(selection.on_evaluation(run, epoch + 1))
            metrics.update(run.timer.summary(reset=True))
            run.logger.log(metrics, epoch + 1)
            common.print_epoch(run, epoch + 1, metrics)
            last = epoch + 1 == run.run_cfg.max_epochs
            halt = run.should_halt(stop)
            if halt or last or (epoch + 1) % run.run_cfg.ckpt_every == 0:
                common.save(run, epoch + 1, optimizer, ADAPTERS, {"history": history})
            if halt:
                break
    if common.stopped_by_signal(run, stop):
        return {}
    chosen = selection.on_finish(run, epoch + 1)  # keep_best: the adapter that validated best
    final = common.final_evaluation(run, epoch + 1)
    run.logger.log({**final, **chosen}, epoch + 1)
    common.finish(run)
    return final
