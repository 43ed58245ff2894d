"""Critic co-training: keep fitting the value model on the policy's own rollouts while the policy trains.

A critic distilled off-policy (StitchVM stage 2 regresses on forward-noised *real* images) estimates
E[r(x_0) | z_t] under the data distribution. RL moves the policy off that distribution, and the value of the
policy's own latents drifts. Co-training regresses the value at every visited latent on the realised reward of
the trajectory it lies on, a Monte-Carlo target of V^pi(z_k) = E_pi[R | z_k] (as DPOK's value baseline):

    L_V = mean_{(i, k)} (V_omega(z_{i,k}, sigma_k) - R_i)^2          R_i = r(D(z_{i,N})), the finished sample

with its own AdamW and learning rate, on the current epoch's trajectories only (on-policy, no replay buffer).
Its minimiser over the policy's trajectory distribution is E_pi[R | z_k], the value a dense advantage needs.

Which parameters (``critic.cotrain.params``):

    "stitch"        s_psi only (the stitching layer, Eq. 57)
    "stitch+tail"   s_psi and the reward tail r^{>=j} (what StitchVM's stage 2 trains)
    "all"           every critic parameter not shared with the policy or the reward model

The DiT head u^{<=i} is the policy's own frozen transformer and is never trained. Decode-and-score critics
(terminal, tweedie, mc) are the policy plus the reward and have nothing of their own to train: an error.

Calibration metrics (``value_calibration``), logged by the trainers every epoch *before* the update, i.e. on
trajectories the critic has not been fitted on:

    critic/value_mse, critic/value_bias (mean V - R), critic/value_corr      over every (sample, step)
    critic/value_mse@sigma<0.25, critic/value_bias@sigma<0.25, ...          per sigma bucket [previous edge, edge)
                                                                            (the last bucket is sigma<=1.00)

Configured by a ``cotrain`` key inside the critic node (``critic.cotrain=true`` or a mapping of
:class:`CotrainConfig` fields); rl/train.py takes it out of the node before the critic is built.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch
from torch import Tensor, nn

from rl import checkpoint as ckpt
from rl import distributed
from rl.config import ConfigError, check, from_dict, option

PARAM_CHOICES = ("stitch", "stitch+tail", "all")


@dataclass
class CotrainConfig:
    """Critic co-training on the policy's rollouts (``critic.cotrain``)."""

    enabled: bool = option(False, help="keep regressing V(z_t) on the realised reward of the policy's trajectories")
    params: Literal["stitch", "stitch+tail", "all"] = option(
        "stitch+tail", help="trained critic parameters: stitch, stitch+tail (StitchVM stage 2's), or all not "
                            "shared with the policy / reward")
    lr: float = option(1e-5, help="AdamW learning rate of the critic (StitchVM stage 2: 1e-5)")
    stitch_lr_scale: float = option(5.0, help="the stitch's lr is lr times this (StitchVM stage 2: x5)")
    weight_decay: float = option(0.0, help="AdamW weight decay of the critic")
    updates_per_epoch: int = option(4, help="critic optimizer steps per policy epoch")
    batch_size: int = option(64, help="(z_k, sigma_k, R) pairs per critic step, drawn from the epoch's trajectories")
    max_grad_norm: float = option(1.0, help="gradient clipping of the critic")
    sigma_edges: tuple[float, ...] = option((0.25, 0.5, 0.75), help="calibration buckets [0, e1), [e1, e2), ..., "
                                                                    "[e_last, 1]")

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.stitch_lr_scale > 0, "stitch_lr_scale", f"must be > 0, got {self.stitch_lr_scale}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        check(self.updates_per_epoch >= 1, "updates_per_epoch", f"must be >= 1, got {self.updates_per_epoch}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        edges = list(self.sigma_edges)
        check(all(0 < e < 1 for e in edges) and edges == sorted(set(edges)), "sigma_edges",
              f"must be increasing values in (0, 1), got {edges}")


def cotrain_config(node: Any) -> CotrainConfig:
    """The ``critic.cotrain`` node: absent, a bool (``critic.cotrain=true``) or a mapping of CotrainConfig fields."""
    if node is None:
        return CotrainConfig()
    if isinstance(node, bool):
        return CotrainConfig(enabled=node)
    if isinstance(node, str) and node.lower() in ("true", "false"):
        return CotrainConfig(enabled=node.lower() == "true")
    return from_dict(CotrainConfig, node, "critic.cotrain")


# ------------------------------------------------------------------------------------------------ critic helpers
@torch.no_grad()
def trajectory_values(critic, latents: Tensor, sigmas: Tensor, prompts: list[str], batch_size: int,
                      steps: Iterable[int] | Tensor | None = None) -> Tensor:
    """V at the visited latents of a batch of trajectories, batched over (sample, step).

    Args:
        critic: a dense critic (``value(z_t, sigma (n,), prompts)``).
        latents: (B, K+1, C, h, w); sigmas: (K+1,); prompts: B strings.
        batch_size: latents per critic call.
        steps: which of the K+1 latents to score (default all), or a (B, K+1) bool mask of the (row, latent) pairs
            to score; the others are NaN.
    Returns:
        (B, K+1) float32.
    """
    n_rows, n_lat = latents.shape[:2]
    if isinstance(steps, Tensor):
        if steps.shape != (n_rows, n_lat) or steps.dtype != torch.bool:
            raise ValueError(f"a mask of (row, latent) pairs must be bool ({n_rows}, {n_lat}), got {steps.dtype} "
                             f"{tuple(steps.shape)}")
        rows = [(i, k) for k, i in torch.nonzero(steps.T).tolist()]  # latent-major, as below
    else:
        steps = list(range(n_lat)) if steps is None else list(steps)
        rows = [(i, k) for k in steps for i in range(n_rows)]
    out = torch.full((n_rows, n_lat), math.nan, device=latents.device)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        i_idx = torch.tensor([i for i, _ in chunk], device=latents.device)
        k_idx = torch.tensor([k for _, k in chunk], device=latents.device)
        z = latents[i_idx, k_idx]  # (n, C, h, w)
        sigma = sigmas.to(latents.device)[k_idx].float()  # (n,)
        out[i_idx, k_idx] = critic.value(z, sigma, [prompts[i] for i, _ in chunk]).float()
    return out


@torch.no_grad()
def realised_reward(run, z_0: Tensor, prompts: list[str], batch_size: int) -> Tensor:
    """R = r(D(z_0)) of finished samples with the run's pixel reward, (B,) float32."""
    if run.reward is None:
        raise ValueError("this trainer needs the pixel reward of finished samples (run.reward); rl/train.py sets it")
    out = []
    for start in range(0, z_0.shape[0], batch_size):
        images = run.policy.decode(z_0[start:start + batch_size])
        out.append(run.reward(images, prompts[start:start + batch_size]).float())
    return torch.cat(out)


def value_calibration(values: Tensor, sigmas: Tensor, rewards: Tensor, edges: Iterable[float] = (0.25, 0.5, 0.75),
                      prefix: str = "critic") -> dict[str, float]:
    """How well V predicts the realised reward, overall and per sigma bucket.

    Args:
        values: (N,) V(z_k) at visited latents.  sigmas: (N,) their sigma.  rewards: (N,) the realised reward
            of the trajectory each latent lies on. Non-finite values are ignored.
        edges: inner bucket edges; bucket b is [edges[b-1], edges[b]) and the last is [edges[-1], 1].
    Returns:
        {prefix/value_mse, prefix/value_bias, prefix/value_corr, prefix/value_mse@sigma<e, prefix/value_bias@sigma<e,
        ..., prefix/value_mse@sigma<=1.00, ...}; a bucket without points is left out.
    """
    v, s, r = values.float().flatten(), sigmas.float().flatten(), rewards.float().flatten()
    ok = torch.isfinite(v) & torch.isfinite(r)
    v, s, r = v[ok], s[ok], r[ok]
    out: dict[str, float] = {}
    if v.numel() == 0:
        return out
    err = v - r
    out[f"{prefix}/value_mse"] = (err**2).mean().item()
    out[f"{prefix}/value_bias"] = err.mean().item()
    if v.numel() > 1 and v.std() > 0 and r.std() > 0:
        out[f"{prefix}/value_corr"] = torch.corrcoef(torch.stack([v, r]))[0, 1].item()
    bounds = [0.0, *edges, math.inf]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        inside = (s >= lo) & (s < hi)
        if inside.any():
            name = f"sigma<{hi:.2f}" if math.isfinite(hi) else "sigma<=1.00"
            out[f"{prefix}/value_mse@{name}"] = (err[inside] ** 2).mean().item()
            out[f"{prefix}/value_bias@{name}"] = err[inside].mean().item()
    return out


def trajectory_calibration(values: Tensor, sigmas: Tensor, rewards: Tensor,
                           edges: Iterable[float] = (0.25, 0.5, 0.75)) -> dict[str, float]:
    """value_calibration of (B, K+1) values at the (K+1,) visited sigmas against each trajectory's (B,) reward."""
    return value_calibration(values, sigmas.to(values.device).expand_as(values),
                             rewards.to(values.device).view(-1, 1).expand_as(values), edges)


def shared_parameters(run) -> list[nn.Parameter]:
    """Parameters a critic may share with the policy or the reward model: never co-trained, never frozen here."""
    params = list(run.policy.parameters())
    if isinstance(run.reward, nn.Module):
        params += list(run.reward.parameters())
    return params


def own_parameters(critic, exclude: Iterable[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    """The critic's named parameters that are not in ``exclude`` (the policy's and the reward's), by identity."""
    if not isinstance(critic, nn.Module):
        return []
    excluded = {id(p) for p in exclude}
    return [(n, p) for n, p in critic.named_parameters() if id(p) not in excluded]


def freeze(critic, exclude: Iterable[nn.Parameter]) -> None:
    """requires_grad = False on the critic's own parameters: trainers differentiate V in z_t, never in omega.

    Call after the policy's LoRA is added so that shared modules (StitchVM's head, tweedie's denoiser) keep the
    policy's trainable adapters."""
    for _, p in own_parameters(critic, exclude):
        p.requires_grad_(False)


def select_parameters(critic, which: str, exclude: Iterable[nn.Parameter]) -> tuple[list[nn.Parameter],
                                                                                      list[nn.Parameter]]:
    """(stitch parameters, other parameters) that ``which`` co-trains; raises ConfigError when there are none."""
    from critics.stitchvm import StitchVM

    if which not in PARAM_CHOICES:
        raise ConfigError(f"critic.cotrain.params: must be one of {PARAM_CHOICES}, got {which!r}")
    exclude = list(exclude)
    own = own_parameters(critic, exclude)
    if not own:
        raise ConfigError(f"critic.cotrain: critic {type(critic).__name__} has no parameters of its own to train "
                          f"(terminal, tweedie and mc are the policy plus the reward); co-train a learned value "
                          f"model such as stitchvm, or set critic.cotrain.enabled=false")
    if isinstance(critic, StitchVM):
        stitch = critic.stitch_parameters()
        stitch_ids = {id(p) for p in stitch}
        if which == "stitch":
            return stitch, []
        if which == "stitch+tail":
            return stitch, [p for _, p in critic.tail_named_parameters() if id(p) not in stitch_ids]
        return stitch, [p for _, p in own if id(p) not in stitch_ids]
    if which != "all":
        raise ConfigError(f"critic.cotrain.params={which!r} needs a StitchVM critic; {type(critic).__name__} "
                          f"only supports 'all'")
    return [], [p for _, p in own]


# ------------------------------------------------------------------------------------------------ the trainer
class CriticTrainer:
    """Regresses V(z_k, sigma_k) on the realised reward of the policy's trajectories (module docstring).

    Args:
        critic: a learned critic (StitchVM or any nn.Module critic).
        cfg: CotrainConfig.
        exclude: parameters that belong to the policy / reward (shared modules are never trained here).
    """

    def __init__(self, critic, cfg: CotrainConfig, exclude: Iterable[nn.Parameter] = ()):
        exclude = list(exclude)
        self.critic, self.cfg = critic, cfg
        stitch, rest = select_parameters(critic, cfg.params, exclude)
        self.params = stitch + rest
        names = {id(p): n for n, p in own_parameters(critic, exclude)}
        self.names = [names[id(p)] for p in self.params]
        freeze(critic, exclude)
        groups = [{"params": stitch, "lr": cfg.lr * cfg.stitch_lr_scale}] if stitch else []
        groups += [{"params": rest, "lr": cfg.lr}] if rest else []
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    @contextlib.contextmanager
    def _trainable(self):
        for p in self.params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in self.params:
                p.requires_grad_(False)

    def calibration(self, values: Tensor, sigmas: Tensor, rewards: Tensor) -> dict[str, float]:
        """trajectory_calibration with this trainer's sigma buckets."""
        return trajectory_calibration(values, sigmas, rewards, self.cfg.sigma_edges)

    def update(self, latents: Tensor, sigmas: Tensor, rewards: Tensor, prompts: list[str],
               generator: torch.Generator | None = None) -> dict[str, float]:
        """``updates_per_epoch`` AdamW steps on L_V over random (sample, step) pairs of these trajectories.

        Args:
            latents: (B, K+1, C, h, w) visited latents; sigmas: (K+1,); rewards: (B,) realised rewards;
            prompts: B strings. Rows with a non-finite reward are skipped.
        Returns:
            {critic/train_mse, critic/grad_norm, critic/skipped_updates}.
        """
        n_rows, n_lat = latents.shape[:2]
        finite_rows = torch.isfinite(rewards).nonzero().flatten().to(latents.device)
        losses, norms, skipped = [], [], 0
        # several processes: the steps below are collectives, so whether to take them is decided by all. A process
        # without a finite row this epoch still runs the same critic forward and backward (under ZeRO-3 the head's
        # partitioned blocks gather their weights in it, a collective too), weighted 0, so it adds zero gradients
        if not distributed.any_process_of_group(finite_rows.numel() > 0, self.params[0].device):
            return {"critic/skipped_updates": float(self.cfg.updates_per_epoch)}
        has_rows = finite_rows.numel() > 0
        pool = finite_rows if has_rows else torch.arange(n_rows, device=latents.device)
        with self._trainable():
            for _ in range(self.cfg.updates_per_epoch):
                self.optimizer.zero_grad(set_to_none=True)
                pick = torch.randint(0, pool.numel() * n_lat, (self.cfg.batch_size,), generator=generator,
                                     device=generator.device if generator is not None else "cpu").to(latents.device)
                i_idx, k_idx = pool[pick // n_lat], pick % n_lat
                value = self.critic.value(latents[i_idx, k_idx], sigmas.to(latents.device)[k_idx].float(),
                                          [prompts[i] for i in i_idx.tolist()]).float()
                if has_rows:
                    loss = ((value - rewards.to(latents.device)[i_idx].float()) ** 2).mean()
                else:  # exactly zero gradients, even where the value is not finite
                    loss = torch.where(torch.isfinite(value), value, torch.zeros_like(value)).sum() * 0.0
                loss.backward()
                # each critic copy takes the same, averaged step (the decision is shared too)
                finite = distributed.average_gradients(self.params, math.isfinite(loss.item()))
                norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
                if not (math.isfinite(norm) and finite):
                    self.optimizer.zero_grad(set_to_none=True)  # a non-finite step never reaches the critic
                    skipped += 1
                    continue
                self.optimizer.step()
                if has_rows:
                    losses.append(loss.item())
                norms.append(norm)
        out = {"critic/skipped_updates": float(skipped)}
        if losses:
            out.update({"critic/train_mse": sum(losses) / len(losses), "critic/grad_norm": sum(norms) / len(norms)})
        return out

    # ------------------------------------------------------------------------------------------- checkpoints
    def state(self) -> tuple[dict[str, dict[str, Tensor]], dict]:
        """(tensor groups, JSON state) for rl.common.save: the trained critic parameters and the optimizer."""
        tensors = {n: p.detach().clone() for n, p in zip(self.names, self.params)}
        opt_tensors, opt_meta = ckpt.optimizer_state_to_tensors(self.optimizer.state_dict())
        return {"critic": tensors, "critic_optimizer": opt_tensors}, {"critic_optimizer": opt_meta}

    def load(self, tensors: dict[str, dict[str, Tensor]], state: dict) -> None:
        """Inverse of :meth:`state`; every trained parameter must be present."""
        saved = tensors.get("critic", {})
        missing = sorted(set(self.names) - saved.keys())
        if missing:
            raise ConfigError(f"checkpoint has no co-trained critic state for {missing[:5]}: resume with the "
                              f"critic.cotrain settings it was written with (critic.cotrain.params)")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(saved[n].to(p.device, p.dtype))
        self.optimizer.load_state_dict(ckpt.optimizer_state_from_tensors(tensors["critic_optimizer"],
                                                                         state["critic_optimizer"]))


def build(run, exclude: Iterable[nn.Parameter]) -> CriticTrainer | None:
    """The run's CriticTrainer, or None when ``critic.cotrain`` is off. ``exclude``: ``shared_parameters(run)``,
    taken after the policy's LoRA is added."""
    cfg = run.cotrain
    if cfg is None or not cfg.enabled:
        return None
    if not run.critic.dense:
        raise ConfigError("critic.cotrain: the terminal critic has no value to co-train; use a value critic "
                          "(e.g. --critic stitchvm)")
    return CriticTrainer(run.critic, cfg, exclude)


def restore(trainer: CriticTrainer | None, source: str) -> None:
    """Load the co-trained critic from the checkpoint ``source`` resolves to (see rl.common.restore)."""
    if trainer is None:
        return
    loaded = ckpt.load_checkpoint(source)
    trainer.load(loaded.tensors, loaded.state)


@torch.no_grad()
def _rollout(run, prompts: list[str], num_steps: int, guidance_scale: float, generator: torch.Generator,
             batch_size: int) -> tuple[Tensor, Tensor]:
    from policies import samplers

    policy = run.policy
    sigmas = policy.sigmas(num_steps, run.device)
    latents = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        cond = policy.encode_prompts(batch)
        traj = samplers.sample(policy.velocity_fn(cond, guidance_scale), policy.noise(len(batch), generator), sigmas)
        latents.append(traj.latents)
    return torch.cat(latents), sigmas


def rollout_and_update(run, trainer: CriticTrainer, prompts: list[str], num_steps: int, generator: torch.Generator,
                       guidance_scale: float = 1.0, batch_size: int = 32) -> dict[str, float]:
    """For trainers whose rollouts keep no finished trajectories (DRaFT, DiffusionNFT): sample the current policy
    (ODE, all latents kept), score the finished samples, log calibration, then update the critic.

    Returns the calibration (before the update) and the update's metrics.
    """
    latents, sigmas = _rollout(run, prompts, num_steps, guidance_scale, generator, batch_size)
    rewards = realised_reward(run, latents[:, -1], prompts, batch_size)
    values = trajectory_values(run.critic, latents, sigmas, prompts, batch_size)
    # several processes (each passes its share of the prompts): calibration over all of them
    metrics = trainer.calibration(run.accelerator.gather(values), sigmas, run.accelerator.gather(rewards))
    metrics.update(trainer.update(latents, sigmas, rewards, prompts, generator))
    return metrics
