"""Likelihood-ratio policy gradient for flow samplers, shared by Flow-GRPO (rl/grpo.py) and DDPO (rl/ddpo.py).

Both papers treat the N-step stochastic sampler as an MDP: state (z_k, sigma_k), action z_{k+1}, policy
pi_theta(z_{k+1} | z_k) = N(mu_theta(z_k), std_k^2 I) (the Flow-GRPO SDE step, policies/samplers.py), reward R
at the end. What is written once here:

- ``collect``: SDE rollouts that keep every latent z_0..z_N (z_0 = noise) and every step's log pi_old, with an
  optional SDE window (Flow-GRPO-Fast: stochastic steps only inside a window, ODE elsewhere), CFG on or off,
  and the realised reward R = r(D(z_N)).
- ``rescore``: log pi_theta of a stored step under the current policy — the same ``sde_step`` that sampled it,
  so for an unchanged policy the ratio is exactly 1.
- ``clipped_pg_loss``: the PPO-clip surrogate on per-step advantages plus Flow-GRPO's KL to the reference.
- ``ppo_update``: minibatch epochs over (sample, trained step) with gradient accumulation over steps.
- Several processes (rl/distributed.py): ``collect`` samples this process's slice of every rollout round;
  ``gather`` assembles per-row results (rewards, values, masks) in global row order for the advantages, whose
  rows of this process (``process_rows``) ``ppo_update`` then trains on, ``train_batch_size / P`` rows per
  process and optimizer step.
- ``gradient_variance``: per-sample policy gradients for a set of advantage estimators on the same samples
  (the dense-vs-sparse variance comparison).

Log-probs are *averaged* over latent elements (``sde_step``'s default, as Flow-GRPO): the ratio's magnitude is
then independent of resolution and the clip range 1e-4 transfers between 64^2 and 1024^2. The KL term is the
exact KL between the two step Gaussians (same std), likewise averaged over elements:
KL(N(mu_theta, std^2) || N(mu_ref, std^2)) per element = (mu_theta - mu_ref)^2 / (2 std^2).

Notation:  latents (B, N+1, C, h, w) z_0..z_N; log_probs (B, N) log pi_old(z_{k+1} | z_k); sde_mask (B, N);
           adv (B, N) per-step advantages (sparse: one per sample broadcast over its steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from policies import lora, samplers
from policies.flow import FlowPolicy, PromptEmbeds
from rl import common, cotrain, distributed, selection
from rl.advantages import value_steps
from rl.config import check
from rl.cotrain import CriticTrainer, realised_reward


# ------------------------------------------------------------------------------------------------ setup
def epoch_generator(run: common.Run, epoch: int, stage: int) -> tuple[np.random.Generator, torch.Generator]:
    """(numpy rng, torch generator) for one stage of one epoch: a function of (seed, epoch, stage), so a resumed
    run draws the same noise as an uninterrupted one."""
    rng = np.random.default_rng([run.run_cfg.seed, epoch, stage])
    return rng, torch.Generator(run.device).manual_seed(int(rng.integers(2**31)))


def process_rows(n: int, batch_size: int, accelerator) -> list[int]:
    """Global indices of this process's rows when n rows are sampled in rounds of ``batch_size`` (``collect``)."""
    index = []
    for start in range(0, n, batch_size):
        mine = distributed.process_slice(min(batch_size, n - start), accelerator)
        index += range(start + mine.start, start + mine.stop)
    return index


def gather(run: common.Run, x: Tensor, n: int, batch_size: int) -> Tensor:
    """Per-row results of this process's rows of ``collect`` (k, ...) -> all n rows (n, ...) in global order."""
    return distributed.gather_rows(run.accelerator, x, process_rows(n, batch_size, run.accelerator), n)


# ------------------------------------------------------------------------------------------------ rollouts
class SDERollout(NamedTuple):
    prompts: list[str]   # B prompts, each prompt's group in consecutive rows
    latents: Tensor      # (B, N+1, C, h, w) z_0 (noise) .. z_N (clean)
    sigmas: Tensor       # (N+1,)
    log_probs: Tensor    # (B, N) log pi_old(z_{k+1} | z_k), mean over elements; 0 on ODE steps
    sde_mask: Tensor     # (B, N) bool, the stochastic (trainable) steps
    rewards: Tensor      # (B,) realised reward r(D(z_N)), float32
    sde_type: str = "flow"  # the stochastic steps' kind (samplers.SDE_TYPES); re-scoring uses the same


EXACT_ODE_HELP = ("dense: V carried exactly across ODE steps, V(z_k) = V(z_k+1) (after a Fast window's last "
                  "stochastic step V = R), the critic only at latents that begin a stochastic step (its calibration "
                  "metrics too); false: the critic at every latent (the sessions-5-7 runs)")
VALUES_AT_HELP = ("dense: ask the critic at every stochastic step's latent, or (trained) draw each group's "
                  "timestep_fraction of the steps before the value pass and ask it there only, which cuts the "
                  "critic's cost to that fraction (with timestep_fraction 1 it asks where 'stochastic' does); the "
                  "same steps in every inner epoch; the critic/value_* metrics then cover those latents only. Needs "
                  "gae_lambda 1 and exact_ode: R - V(z_k) reads V at z_k alone")
DENSE_CALIBRATION_HELP = ("dense: 'batch' rescales each step's values around their group mean by the batch's "
                          "least-squares slope of R on V before the advantages (rl.advantages.calibrate_values), so a "
                          "step where the critic carries little information gets little credit; logged as "
                          "adv/value_slope")


def reward_metrics(rewards: Tensor, group_size: int) -> dict[str, float]:
    """The epoch's reward metrics: ``reward/mean`` and ``reward/std`` over the batch (finite values),
    ``reward/nonfinite`` and, for groups of >= 2 consecutive rows, ``reward/group_std``: the mean over groups of the
    within-group standard deviation, the spread a group-relative advantage is made of. The batch std mixes prompts, so
    only the within-group one shows what the sampler's noise (eta, group noise, the SDE window) gives each group.
    Groups with a non-finite reward are left out of it.
    """
    finite = torch.isfinite(rewards)
    metrics = {**common.log_mean_std("reward", rewards), "reward/nonfinite": float((~finite).sum())}
    if group_size >= 2 and rewards.numel() % group_size == 0:
        groups = rewards.float().view(-1, group_size)
        ok = torch.isfinite(groups).all(dim=1)
        metrics["reward/group_std"] = groups[ok].std(dim=1).mean().item() if ok.any() else math.nan
    return metrics


def check_window(num_steps: int, window: int, window_start: tuple[int, int]) -> None:
    """Config check of a Flow-GRPO-Fast window (``window`` steps starting at U{lo..hi}) for a ``num_steps`` sampler."""
    check(0 <= window <= num_steps, "sde_window", f"must be in 0..num_steps ({num_steps}), got {window}")
    lo, hi = window_start
    # drawn for every rollout batch, with or without a window (collect)
    check(0 <= lo <= hi, "sde_window_start", f"need 0 <= lo <= hi, got ({lo}, {hi})")
    if window:
        last = num_steps - window
        check(hi <= last, "sde_window_start", f"need 0 <= lo <= hi <= num_steps - sde_window ({last}), got ({lo}, {hi})")


SDE_TYPE_HELP = ("the stochastic steps' kind: 'flow', Flow-GRPO's SDE (Euler-Maruyama, noise s = eta "
                 "sqrt(sigma / (1 - sigma))), or 'cps', coefficients-preserving steps (Flow-CPS, arXiv 2509.05952: "
                 "z_k+1 on the forward path's coefficients, a share sin(eta pi / 2) of its noise redrawn; eta in "
                 "[0, 1]; the step into sigma 0 is deterministic)")


def check_sde(cfg) -> None:
    """Config check of ``sde_type`` with ``eta`` and the window: a CPS step needs eta <= 1, and the step into
    sigma = 0 is deterministic, so a window must hold another step."""
    check(cfg.sde_type in samplers.SDE_TYPES, "sde_type", f"must be one of {samplers.SDE_TYPES}, got {cfg.sde_type!r}")
    if cfg.sde_type == "cps":
        check(cfg.eta <= 1, "eta", f"CPS redraws a share sin(eta pi / 2) of the noise: eta must be in (0, 1], got "
                                   f"{cfg.eta}")
        if cfg.sde_window == 1:  # a longer window always holds a step before the last
            check(cfg.sde_window_start[1] <= cfg.num_steps - 2, "sde_window",
                  f"with sde_type cps the last step (into sigma 0) is deterministic: a 1-step window must start "
                  f"before step {cfg.num_steps - 1}")
        elif cfg.sde_window == 0:
            check(cfg.num_steps >= 2, "num_steps", "with sde_type cps the step into sigma 0 is deterministic: needs "
                                                   f">= 2 steps, got {cfg.num_steps}")


def check_values_at(cfg) -> None:
    """Config check of ``values_at`` (GRPOConfig / DDPOConfig)."""
    if cfg.values_at == "trained":
        check(cfg.advantages == "dense", "values_at", "'trained' narrows the critic's values, which only dense "
                                                      "advantages read: set algo.advantages=dense or "
                                                      "values_at=stochastic")
        check(cfg.gae_lambda == 1.0 and cfg.exact_ode, "values_at",
              f"'trained' needs gae_lambda 1 and exact_ode (R - V(z_k) reads V at z_k alone; GAE with lambda < 1 "
              f"reads every later latent), got gae_lambda {cfg.gae_lambda}, exact_ode {cfg.exact_ode}")


class AdvantageSteps(NamedTuple):
    """Which steps an epoch's advantages are computed on and trained (see :func:`advantage_steps`)."""

    mine: list[int]              # this process's rows (global indices)
    mask: Tensor                 # (B, N) bool, every row: its stochastic steps (values_at: trained, the drawn ones)
    asked: Tensor | None         # (b, N) this process's rows of the drawn steps (values_at: trained), else None
    steps: Tensor | None         # (b, n_t) their indices, fixed for every inner epoch, else None (ppo_update draws)


def advantage_steps(run: common.Run, rollout: SDERollout, n_rows: int, cfg, epoch: int,
                    group_size: int) -> AdvantageSteps:
    """GRPO / DDPO, before the value pass: the stochastic steps of every row (gathered), and with ``values_at:
    trained`` each group's ``timestep_fraction`` of them, drawn from the (seed, epoch, 4) generator alike on every
    process: the critic is asked there only and the update trains exactly those steps."""
    mine = process_rows(n_rows, cfg.rollout_batch_size, run.accelerator)
    mask = gather(run, rollout.sde_mask, n_rows, cfg.rollout_batch_size)
    if cfg.values_at != "trained":
        return AdvantageSteps(mine, mask, None, None)
    steps = train_steps(mask, cfg.timestep_fraction, epoch_generator(run, epoch, 4)[1], group_size)
    mask = torch.zeros_like(mask).scatter_(1, steps, True)
    return AdvantageSteps(mine, mask, mask[mine], steps[mine])


def trajectory_values(run: common.Run, critic, rollout: SDERollout, rewards: Tensor, cfg, edges,
                      asked: Tensor | None = None) -> tuple[Tensor, dict]:
    """Stage 2 of GRPO / DDPO: V(z_k) along this process's trajectories, gathered for every row (B, N+1), and its
    calibration against the realised ``rewards`` (B,) per sigma bucket ``edges``.

    With dense advantages and ``cfg.exact_ode`` the critic is asked only at latents that begin a stochastic step
    of some row (NaN elsewhere: rl.advantages.ode_values carries V exactly across the rest, and the calibration
    skips them); otherwise (the critic-everywhere estimator, or a sparse run that co-trains its critic) at every
    latent. ``asked`` ((b, N) bool, this process's rows) narrows it to the latents that begin those steps
    (``values_at: trained``)."""
    steps = value_steps(rollout.sde_mask) if cfg.exact_ode and cfg.advantages == "dense" else None
    if asked is not None:  # (b, N) this process's rows: the latents that begin these steps only
        steps = torch.cat([asked, asked.new_zeros(asked.shape[0], 1)], 1)
    with run.timer("value"):
        local = cotrain.trajectory_values(critic, rollout.latents, rollout.sigmas, rollout.prompts,
                                          cfg.value_batch_size, steps)
        values = gather(run, local, len(rewards), cfg.rollout_batch_size)
    return values, cotrain.trajectory_calibration(values, rollout.sigmas, rewards, edges)


def window_steps(num_steps: int, window: int, start: int) -> list[int]:
    """The stochastic steps of Flow-GRPO-Fast: ``window`` consecutive steps from ``start`` (window 0 = all)."""
    if window == 0:
        return list(range(num_steps))
    if not 0 <= start <= num_steps - window:
        raise ValueError(f"SDE window [{start}, {start + window}) does not fit a {num_steps}-step schedule")
    return list(range(start, start + window))


@torch.no_grad()
def collect(run: common.Run, rows: list[str], num_steps: int, eta: float, guidance_scale: float, batch_size: int,
            window: int, window_start: tuple[int, int], rng: np.random.Generator,
            generator: torch.Generator, sde_generator: torch.Generator | None = None,
            shared_noise_group: int = 1, sde_type: samplers.SDEType = "flow") -> SDERollout:
    """Sample ``rows`` (one prompt per row) with the policy's SDE sampler and score the finished samples.

    Rows go in rounds of ``batch_size``, one SDE window per round (callers keep groups inside one round). With
    several processes each samples its slice of every round and returns those rows only (``process_rows``
    gives their global indices); the window and z_T of every row are drawn as on a single process.

    Args:
        run: the run (policy with its active adapter, reward).
        rows: B prompts (the global batch).
        num_steps: N. eta: SDE noise level (> 0). guidance_scale: CFG weight (1 = CFG-free).
        batch_size: rows per rollout round (global).
        window: Flow-GRPO-Fast window length (0 = SDE at every step).
        window_start: (lo, hi), the window's first step ~ U{lo..hi}.
        rng, generator: randomness of the windows and of z_T (the same on every process).
        sde_generator: the SDE steps' noise (default ``generator``); give each process its own
            (rl.distributed.process_generator) so that processes do not share noise.
        shared_noise_group: G > 1: each run of G consecutive rows (a group) starts from one z_T (DanceGRPO's
            shared initial noise), so the rewards within a group differ only through the SDE steps' noise, the
            actions the policy gradient credits; 1: every row draws its own z_T.
        sde_type: "flow" (Flow-GRPO's SDE) or "cps" (coefficients-preserving steps), samplers.stochastic_step.
    """
    policy, accel = run.policy, run.accelerator
    sde_generator = generator if sde_generator is None else sde_generator
    sigmas = policy.sigmas(num_steps, run.device)
    latents, log_probs, masks, rewards, mine_rows = [], [], [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        steps = window_steps(num_steps, window, int(rng.integers(window_start[0], window_start[1] + 1)))
        if len(chunk) % shared_noise_group:
            raise ValueError(f"a rollout round of {len(chunk)} rows does not hold whole groups of {shared_noise_group}")
        # the whole round's noise, on every process; one draw per group when groups share z_T
        z_T = policy.noise(len(chunk) // shared_noise_group, generator).repeat_interleave(shared_noise_group, 0)
        mine = distributed.process_slice(len(chunk), accel)
        batch = chunk[mine]
        mine_rows += batch
        # under autocast like the re-scoring in ppo_update, so that an unchanged policy re-scores to ratio 1
        with run.timer("rollout"), accel.autocast():
            cond = policy.encode_prompts(batch)
            traj = samplers.sample(policy.velocity_fn(cond, guidance_scale), z_T[mine], sigmas, eta=eta,
                                   sde_steps=steps, generator=sde_generator, sde_type=sde_type)
        with run.timer("reward"):
            rewards.append(realised_reward(run, traj.z_tau, batch, batch_size))
        latents.append(traj.latents)
        log_probs.append(traj.log_probs)
        masks.append(traj.sde_mask.to(run.device).expand(len(batch), -1))
    return SDERollout(mine_rows, torch.cat(latents), sigmas, torch.cat(log_probs), torch.cat(masks),
                      torch.cat(rewards), sde_type)


def rescore(policy: FlowPolicy, rollout: SDERollout, idx: Tensor, steps: Tensor, cond: PromptEmbeds, eta: float,
            guidance_scale: float) -> samplers.StepOutput:
    """log pi_theta(z_{k+1} | z_k) of stored steps under the policy's active adapter (with grad).

    Args:
        idx: (b,) rows of the rollout.  steps: (b,) the step k of each row.  cond: the rows' prompt embeddings.
    Returns:
        the StepOutput of the rollout's step kind (``rollout.sde_type``): mean (b, C, h, w) and log_prob (b,) carry
        the graph of v_theta.
    """
    z = rollout.latents[idx, steps]  # (b, C, h, w)
    z_next = rollout.latents[idx, steps + 1]
    sigma, sigma_next = rollout.sigmas[steps], rollout.sigmas[steps + 1]  # (b,)
    v = policy.velocity(z, sigma, cond, guidance_scale)
    return samplers.stochastic_step(rollout.sde_type, v, z, sigma, sigma_next, eta, prev_sample=z_next,
                                    sigma_at_one=rollout.sigmas[1])


# ------------------------------------------------------------------------------------------------ loss
class PGLoss(NamedTuple):
    loss: Tensor         # scalar: policy_loss + kl_beta * kl
    policy_loss: Tensor  # scalar: mean max(-A rho, -A clip(rho, 1 - eps, 1 + eps))
    kl: Tensor           # scalar: mean (mu_theta - mu_ref)^2 / (2 std^2) (0 without a reference)
    clipfrac: Tensor     # scalar: fraction of |rho - 1| > eps
    approx_kl: Tensor    # scalar: 1/2 mean (log pi_theta - log pi_old)^2 (old -> new drift)
    ratio: Tensor        # scalar: mean rho


def clipped_pg_loss(log_prob: Tensor, log_prob_old: Tensor, adv: Tensor, clip_range: float,
                    mean: Tensor | None = None, mean_ref: Tensor | None = None, std: Tensor | None = None,
                    kl_beta: float = 0.0) -> PGLoss:
    """PPO-clip on one step's log-probs (DDPO Eq. 4 / Flow-GRPO Eq. 8) with Flow-GRPO's KL to the reference.

    Args:
        log_prob: (b,) log pi_theta of the stored steps (with grad).
        log_prob_old: (b,) log pi_old from the rollout.
        adv: (b,) advantages of these (sample, step) pairs (already clipped).
        clip_range: epsilon of the ratio clip.
        mean, mean_ref, std: (b, C, h, w) step means of theta and of the reference (adapters off) and the step
            std (b, 1, 1, 1); all None to skip the KL.
        kl_beta: beta_KL.
    """
    log_ratio = log_prob.float() - log_prob_old.float()
    ratio = torch.exp(log_ratio)
    adv = adv.float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    if mean is not None and mean_ref is not None and std is not None:
        dims = tuple(range(1, mean.ndim))
        kl = (((mean.float() - mean_ref.float().detach()) ** 2) / (2 * std.float() ** 2)).mean(dims).mean()
    else:
        kl = torch.zeros((), device=log_prob.device)
    with torch.no_grad():
        clipfrac = ((ratio - 1).abs() > clip_range).float().mean()
        approx_kl = 0.5 * (log_ratio**2).mean()
    return PGLoss(policy_loss + kl_beta * kl, policy_loss, kl, clipfrac, approx_kl, ratio.detach().mean())


# ------------------------------------------------------------------------------------------------ update
@dataclass(frozen=True)
class UpdateSettings:
    """What ``ppo_update`` needs from a trainer's config (see GRPOConfig / DDPOConfig for the meanings)."""

    eta: float
    guidance_scale: float
    clip_range: float
    kl_beta: float
    train_batch_size: int
    timestep_fraction: float
    inner_epochs: int
    max_grad_norm: float
    ema_decay: float = 0.0  # decay d of the "ema" adapter (0 = no EMA), warmed up by common.ema_decay_at
    ema_step: int = 0  # the run's optimizer-step index of this call's first step (the warm-up's clock)


def train_steps(mask: Tensor, fraction: float, generator: torch.Generator, group_size: int = 1) -> Tensor:
    """Per row, a random subset of its stochastic steps: (B, n) step indices, n = max(1, round(fraction * #SDE)).

    Rows must have the same number of stochastic steps (one window length per run). With ``group_size`` > 1 the
    rows of each group of consecutive rows share their subset (and must share their mask)."""
    counts = mask.sum(1)
    if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
        raise ValueError(f"every row needs the same, non-zero number of stochastic steps; got {counts.tolist()}")
    if group_size < 1 or mask.shape[0] % group_size:
        raise ValueError(f"{mask.shape[0]} rows are not a whole number of groups of {group_size}")
    n = max(1, round(fraction * int(counts[0])))
    shape = (mask.shape[0] // group_size, mask.shape[1])
    keys = torch.rand(shape, generator=generator, device=generator.device).to(mask.device)
    keys = keys.repeat_interleave(group_size, dim=0)
    keys = torch.where(mask, keys, torch.full_like(keys, 2.0))  # ODE steps sort last, never picked
    return keys.argsort(dim=1)[:, :n]


def ppo_update(run: common.Run, rollout: SDERollout, adv: Tensor, optimizer: torch.optim.Optimizer,
               params: list[nn.Parameter], s: UpdateSettings, generator: torch.Generator,
               steps: Tensor | None = None) -> dict[str, float]:
    """Minibatch epochs of PPO-clip (+ KL) over the rollout's (sample, trained step) pairs.

    Each inner epoch reshuffles the samples and redraws each sample's trained steps, unless ``steps`` (this
    process's rows, (b, n_t) step indices) fixes them for every inner epoch; the gradient of a
    minibatch is accumulated over its trained steps (one optimizer step per minibatch, as Flow-GRPO / DDPO).
    A minibatch with a non-finite loss or gradient is skipped (it never reaches the weights).

    ``rollout`` and ``adv`` hold this process's rows: each optimizer step takes ``train_batch_size / P`` of them
    on every process, in ``run.gradient_accumulation_steps`` micro-batches (rl.distributed); logged losses are
    means over the global minibatch.
    """
    policy, accel = run.policy, run.accelerator
    transformer = policy.transformer
    n = rollout.latents.shape[0]
    batch_size = s.train_batch_size // accel.num_processes
    names = ("loss/total", "loss/policy", "loss/kl", "policy/clipfrac", "policy/approx_kl", "policy/ratio")
    loss_sums, norms, skipped = [], [], 0  # loss_sums: per optimizer step (num_t, len(names))
    ema_decay = math.nan
    for _ in range(s.inner_epochs):
        perm = torch.randperm(n, generator=generator, device=generator.device).to(run.device)
        steps_all = train_steps(rollout.sde_mask, s.timestep_fraction, generator) if steps is None else steps
        num_t = steps_all.shape[1]
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            micros = distributed.micro_batches(len(idx), run.run_cfg.gradient_accumulation_steps)
            # logged sums stay on the device: an .item() per pass would make the host wait for every forward/backward
            sums = torch.zeros(num_t, len(names), dtype=torch.float64, device=run.device)
            optimizer.zero_grad(set_to_none=True)
            finite = True
            for m, micro in enumerate(micros):
                rows = idx[micro]
                share = distributed.loss_weight(len(rows), len(idx) * accel.num_processes, accel)
                # under autocast as in collect(): the text encoders run in the autocast dtype too, and embeddings
                # that differ from the rollout's move an unchanged policy's ratio off 1 by more than the clip range
                with torch.no_grad(), accel.autocast():
                    cond = policy.encode_prompts([rollout.prompts[i] for i in rows.tolist()])
                for j in range(num_t):
                    k = steps_all[rows, j]  # (b,) one step per row
                    with distributed.gradient_sync(accel, run.trained_module, m == len(micros) - 1 and j == num_t - 1):
                        mean_ref = None
                        if s.kl_beta > 0:
                            with torch.no_grad(), lora.reference_policy(transformer), accel.autocast():
                                mean_ref = rescore(policy, rollout, rows, k, cond, s.eta, s.guidance_scale).mean
                        with accel.autocast():
                            out = rescore(policy, rollout, rows, k, cond, s.eta, s.guidance_scale)
                        loss = clipped_pg_loss(out.log_prob, rollout.log_probs[rows, k], adv[rows, k], s.clip_range,
                                               out.mean, mean_ref, out.std, s.kl_beta)
                        finite = distributed.backward(accel, loss.loss * share / num_t) & finite
                    values = (loss.loss, loss.policy_loss, loss.kl, loss.clipfrac, loss.approx_kl, loss.ratio)
                    sums[j] += torch.stack([v.detach().to(torch.float64) for v in values]) * len(rows)
            norm, stepped = common.clipped_step(accel, optimizer, params, s.max_grad_norm, finite)
            loss_sums.append(sums / (len(idx) * accel.num_processes))
            norms.append(norm)
            skipped += not stepped
            if stepped and s.ema_decay > 0:
                ema_decay = common.ema_decay_at(s.ema_decay, s.ema_step + len(norms) - 1)
                lora.ema_update(transformer, "default", "ema", ema_decay)
    out = {}
    if loss_sums:
        losses = distributed.sum_over_processes(accel, torch.stack(loss_sums)).flatten(0, 1).cpu()  # (steps*num_t, 6)
        out = {name: float(np.nanmean(losses[:, i].numpy())) for i, name in enumerate(names)}
        out["policy/grad_norm"] = float(np.nanmean(norms))
        if s.inner_epochs > 1:
            # per pass: with a clip range near one step's ratio change (ddpo-pytorch's 1e-4), the later passes are
            # mostly clipped and add little but the KL term; this shows it (every pass has the same row count)
            clipped = losses[:, names.index("policy/clipfrac")].view(s.inner_epochs, -1).numpy()
            out.update({f"policy/clipfrac_pass{p + 1}": float(np.nanmean(c)) for p, c in enumerate(clipped)})
    out["train/skipped_updates"] = float(skipped)
    if s.ema_decay > 0:
        out["train/ema_decay"] = ema_decay  # the last step's
    return out


def steps_per_epoch(rows: int, train_batch_size: int, inner_epochs: int) -> int:
    """Optimizer steps ``ppo_update`` takes for an epoch of ``rows`` samples (global): one per minibatch of
    ``train_batch_size``, per inner epoch, stepped or skipped."""
    return inner_epochs * math.ceil(rows / train_batch_size)


# ------------------------------------------------------------------------------------------------ diagnostics
def gradient_variance(policy: FlowPolicy, rollout: SDERollout, advs: dict[str, Tensor], params: list[nn.Parameter],
                      eta: float, guidance_scale: float, max_samples: int = 16) -> dict[str, float]:
    """Variance of the per-sample policy-gradient estimate g_i = sum_k A_ik grad log pi(z_{i,k+1} | z_{i,k}) (the
    gradient of the surrogate at rho = 1) for several advantage estimators on the *same* samples (paired).

    Each estimator's advantages are first scaled to unit RMS over the stochastic steps, so estimators with
    different normalisations compare. Reported per estimator ``name``:

        pg/<name>/var      tr Cov(g_i) / n          the variance of the batch-mean gradient g_bar
        pg/<name>/grad_sq  ||g_bar||^2              its squared norm
        pg/<name>/snr      (grad_sq - var) / var    signal-to-noise of g_bar: E||g_bar||^2 = ||E g||^2 + var, so
                                                    this estimates ||E g||^2 / var (~0: no signal at this n)

    Costs one backward per (sample, stochastic step); ``max_samples`` caps the samples used.
    """
    device = rollout.latents.device
    n = min(max_samples, rollout.latents.shape[0])
    mask = rollout.sde_mask[:n]
    scaled = {}
    for name, a in advs.items():
        a = torch.where(mask, a[:n].float(), torch.zeros_like(a[:n].float()))
        scaled[name] = a / ((a**2).sum() / mask.sum().clamp_min(1)).sqrt().clamp_min(1e-12)
    sums = {name: [torch.zeros_like(p, dtype=torch.float32) for p in params] for name in advs}
    sq_norms = {name: 0.0 for name in advs}
    for i in range(n):
        idx = torch.tensor([i], device=device)
        with torch.no_grad():
            cond = policy.encode_prompts([rollout.prompts[i]])
        g_i = {name: [torch.zeros_like(p, dtype=torch.float32) for p in params] for name in advs}
        for k in mask[i].nonzero().flatten().tolist():
            out = rescore(policy, rollout, idx, torch.tensor([k], device=device), cond, eta, guidance_scale)
            grads = torch.autograd.grad(out.log_prob.sum(), params, allow_unused=True)
            for name in advs:
                coef = scaled[name][i, k].item()
                for acc, g in zip(g_i[name], grads):
                    if g is not None:
                        acc.add_(g.float(), alpha=coef)
        for name in advs:
            sq_norms[name] += sum(float((g**2).sum()) for g in g_i[name])
            for acc, g in zip(sums[name], g_i[name]):
                acc.add_(g)
    out = {}
    for name in advs:
        mean_sq = sum(float(((s / n) ** 2).sum()) for s in sums[name])  # ||g_bar||^2
        trace_cov = max(sq_norms[name] / n - mean_sq, 0.0) * n / max(n - 1, 1)  # unbiased; >= 0 up to rounding
        var = trace_cov / n
        out[f"pg/{name}/var"] = var
        out[f"pg/{name}/grad_sq"] = mean_sq
        out[f"pg/{name}/snr"] = (mean_sq - var) / var if var > 0 else math.inf
    return out


# ------------------------------------------------------------------------------------------------ bookkeeping
def start_run(run: common.Run, optimizer, adapters: tuple[str, ...], resume: str | None,
              critic_trainer: CriticTrainer | None, eval_adapter: str = "default") -> tuple[int, list, dict]:
    """Resume (adapters, optimizer, RNG, co-trained critic) or evaluate the initial policy.

    Returns (first epoch, evaluation history, the checkpoint's JSON state ({} when not resuming)). The section
    timer starts empty: start-up (evaluation, validation, restore) is not charged to the first epoch's time/*."""
    if resume:
        epoch, state = common.restore(run, resume, optimizer, adapters)
        cotrain.restore(critic_trainer, str(run.run_dir) if resume == "latest" else resume)
        common.print_resumed(run, epoch)
        selection.on_resume(run, epoch, eval_adapter)
        run.timer.reset()
        return epoch, list(state.get("history", [])), state
    metrics, images = common.evaluate(run, eval_adapter)
    metrics.update(selection.on_evaluation(run, 0, eval_adapter))
    run.logger.log({**metrics, "train/epoch": 0}, 0)
    common.print_epoch(run, 0, metrics)
    if images.numel():
        run.logger.log_images("eval/samples", images, 0)
    run.timer.reset()
    return 0, [metrics], {}


def save(run: common.Run, epoch: int, optimizer, adapters: tuple[str, ...], extra: dict,
         critic_trainer: CriticTrainer | None) -> None:
    """common.save plus the co-trained critic (its parameters and optimizer)."""
    tensors, critic_state = critic_trainer.state() if critic_trainer is not None else ({}, {})
    common.save(run, epoch, optimizer, adapters, {**extra, **critic_state}, tensors)


def end_epoch(run: common.Run, epoch: int, metrics: dict, optimizer, adapters: tuple[str, ...], history: list,
              extra: dict, stop, critic_trainer: CriticTrainer | None, eval_adapter: str = "default") -> bool:
    """Evaluate (every ``eval_every``), log, checkpoint (every ``ckpt_every``, at the last epoch, on SIGTERM or
    out of time). Returns True when the loop must stop. ``extra``: the trainer's JSON state besides history."""
    cfg = run.run_cfg
    if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
        with run.timer("eval"):
            eval_metrics, images = common.held_out(run, epoch + 1, eval_adapter)
        metrics.update(eval_metrics)
        history.append(eval_metrics)
        if images.numel():
            run.logger.log_images("eval/samples", images, epoch + 1)
        metrics.update(selection.on_evaluation(run, epoch + 1, eval_adapter))
    metrics.update(run.timer.summary(reset=True))
    run.logger.log(metrics, epoch + 1)
    common.print_epoch(run, epoch + 1, metrics)
    halt = run.should_halt(stop)
    if halt or epoch + 1 == cfg.max_epochs or (epoch + 1) % cfg.ckpt_every == 0:
        save(run, epoch + 1, optimizer, adapters, {"history": history, **extra}, critic_trainer)
    return halt


def finish_run(run: common.Run, epoch: int, eval_adapter: str = "default") -> dict[str, float]:
    """Final held-out evaluation, logged at ``epoch``, and the diffusers export of ``eval_adapter`` (with
    ``run.keep_best``: of the adapter that validated best, rl.selection)."""
    chosen = selection.on_finish(run, epoch, eval_adapter)
    final = common.final_evaluation(run, epoch, eval_adapter)
    run.logger.log({**final, **chosen}, epoch)
    common.finish(run, eval_adapter)
    return final
