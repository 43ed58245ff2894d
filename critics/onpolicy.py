"""Stage 3 of a stitched critic (ours): on-policy value regression on the policy's own trajectories.

Paper (arXiv 2605.19804) Eq. 8 defines the target of the value model, L = E ‖V(z_t) − r(x0)‖², minimised by
V(z_t) = E[r(x0) | z_t]; stage 2 (critics/distill.py) approximates it off-policy, on forward-noised clean images,
by matching the reward's image embedding. Two things stage 2 cannot see, and that the value benchmark measured
(docs/critic.md): the policy's own latents (z_t on a sampling trajectory, not (1 − σ) E(x) + σ ε of a real
image), and the precision of the *score*: the critic ranks captions almost perfectly but the policy's samples
differ by a few hundredths of cosine. Stage 3 trains the same parameters (stitch + tail) on pairs (z_t, x0) of
one stochastic trajectory of the policy, so r(x0) is an unbiased one-rollout sample of V_MC(z_t):

    L = λ_v · mean_B (V(z_t) − r(x0))² / Var(r)                             value term (Eq. 8, on-policy)
      + λ_e · mean_B ‖ẽ_SVM(z_t) − ẽ_RM(x0)‖² + λ_tok · mean (h_SVM(z_t) − h_RM(x0))²   stage-2 terms, on-policy

Notation          code
  z_t             the trajectory's latent at noise level σ (B, C, h, w); x0 = D(z_0) its decoded end
  V(z_t)          model.score(model.features(z_t, σ, prompts).embed, prompts): the critic's value
  r(x0)           reward(x0, prompts): the frozen reward on the finished sample (what RL optimises)
  ẽ, h            normalised image embedding and final tokens, student on z_t / teacher (original tower) on x0

Choices (not in the paper):
- Trajectories: the policy's SDE sampler (Flow-GRPO form, eta `eta`), CFG drawn per step from `guidance_scales`
  (RL rollouts are CFG-free, evaluation uses CFG), step count drawn from `num_steps`. Each step inserts
  `latents_per_trajectory` noise levels σ ~ U(`sigma_range`) into the schedule and regresses at exactly those
  nodes; the default U(0, 1) covers every level uniformly, as stage 2's default law does.
- The value term is divided by Var(r), a running (EMA, momentum 0.99, bias-corrected as Adam's moments so the first
  steps average the batches seen so far rather than trust the first one) variance of the rewards seen so far: λ_v = 1
  then weighs a fit at the level of R² against the O(1) embedding term, whatever the reward's scale (CLIP 0..1,
  PickScore ~20, HPS ~0.3). A per-batch variance would blow the term up on batches of near-equal rewards (one
  CFG-free batch of failures).
- The embedding and token terms stay (on-policy targets) so the tail keeps the reward's embedding geometry:
  prompt retrieval from noisy latents (paper Table 5) must not degrade while the score sharpens.
- Prompts: a train-split node of the build YAML (never the held-out prompts the benchmark scores).
- Another target (``target``): the value term may regress onto a different reward than the one distilled in
  stage 2 — e.g. a non-differentiable checker (GenEval-style counting and colour checks) that has no tower to
  stitch onto. The stitched tower then serves as the feature extractor and prompt encoder, V(z_t) estimates
  E[r_target(x0) | z_t], and the embedding and token terms (small λ_e, λ_tok) only keep the tail near the
  tower's geometry. The build records the target in the critic's JSON (``value_target``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from critics.distill import LR_DECAYS, lr_multiplier, stitch_tail_optimizer
from critics.stitchvm import StitchVM, save_stitchvm
from critics.tails import make_tail
from rl.config import check, option

VAR_MOMENTUM = 0.99  # EMA of the reward variance that scales the value term


def debiased_ema(ema: float, x: float, step: int, momentum: float = VAR_MOMENTUM) -> tuple[float, float]:
    """One update of an EMA started at 0 (step counts from 0): returns (new ema, bias-corrected estimate
    ema / (1 - momentum^(step+1))), a weighted mean of every x so far, not the first x alone (Adam's correction)."""
    ema = momentum * ema + (1 - momentum) * x
    return ema, ema / (1 - momentum ** (step + 1))


@dataclass
class OnPolicyConfig:
    """Stage-3 hyper-parameters (module docstring)."""

    enabled: bool = option(False, help="run stage 3 after stage 2 (or after init_from).")
    prompts: dict[str, Any] = option(
        default_factory=lambda: {"_component_": "shapes.data.prompts", "split": "train", "n": 65536, "seed": 3},
        help="node giving the training prompts (list[str]); never the held-out benchmark prompts.")
    steps: int = option(2000, help="optimiser steps.")
    trajectories: int = option(32, help="trajectories sampled per step (one prompt each).")
    latents_per_trajectory: int = option(4, help="noise levels regressed per trajectory (batch = product).")
    num_steps: list[int] = option(default_factory=lambda: [10, 20, 25],
                                  help="sampler step counts; one is drawn per optimiser step.")
    guidance_scales: list[float] = option(default_factory=lambda: [1.0, 4.5],
                                          help="CFG weights of the trajectories; one is drawn per optimiser step.")
    eta: float = option(0.7, help="SDE noise level of the trajectories (0 = ODE: x0 is then a function of z_t).")
    sigma_range: tuple[float, float] = option(
        (0.0, 1.0), help="(lo, hi): the inserted noise levels are U(lo, hi); e.g. keep a low-sigma critic (stage 2 "
                         "with a low-sigma law) on the levels it serves.")
    lr: float = option(1e-4, help="AdamW learning rate of the tail.")
    stitch_lr_mult: float = option(5.0, help="the stitch trains at lr × stitch_lr_mult.")
    warmup_steps: int = option(100, help="linear warm-up steps.")
    lr_decay: str = option("cosine", help="after warm-up: constant or cosine to 0 at `steps`.")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    lambda_value: float = option(1.0, help="λ_v, weight of the variance-normalised value term.")
    lambda_embed: float = option(1.0, help="λ_e, weight of the on-policy normalised-embedding term.")
    lambda_tok: float = option(1.0, help="λ_tok, weight of the on-policy token term.")
    grad_clip: float = option(1.0, help="max global grad norm of the trained parameters.")
    log_every: int = option(50, help="callback(step, stats) every this many steps.")
    ckpt_every: int = option(500, help="save to ckpt_dir every this many steps (0: only at the end).")
    ckpt_dir: str | None = option(None, help="checkpoint directory (the build sets output_dir); None: none.")
    target: dict[str, Any] | None = option(
        None, help="node of the reward V regresses onto, r(images, prompts) -> (B,); null: the distilled reward. "
                   "A programmatic checker (critics.rewards.shapes_eval.ShapesEvalReward, GenEval-style, OCR) "
                   "gives a critic of a reward that has no network to stitch onto.")
    seed: int = option(0, help="seed of prompts, noise levels and sampler noise.")
    progress: bool = option(True, help="show a progress bar.")

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(self.trajectories >= 2, "trajectories", f"must be >= 2 (the value term divides by the reward "
                                                       f"variance of the batch), got {self.trajectories}")
        check(self.latents_per_trajectory >= 1, "latents_per_trajectory",
              f"must be >= 1, got {self.latents_per_trajectory}")
        check(len(self.num_steps) > 0 and all(int(n) >= 1 for n in self.num_steps), "num_steps",
              f"must be a non-empty list of step counts >= 1, got {self.num_steps}")
        check(len(self.guidance_scales) > 0 and all(g >= 0 for g in self.guidance_scales), "guidance_scales",
              f"must be a non-empty list of CFG weights >= 0, got {self.guidance_scales}")
        check(self.eta >= 0, "eta", f"must be >= 0, got {self.eta}")
        lo, hi = self.sigma_range
        check(0 <= lo < hi <= 1, "sigma_range", f"need 0 <= lo < hi <= 1, got ({lo}, {hi})")
        check(self.lr > 0 and self.stitch_lr_mult > 0, "lr", "lr and stitch_lr_mult must be > 0")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.lr_decay in LR_DECAYS, "lr_decay", f"must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        check(min(self.lambda_value, self.lambda_embed, self.lambda_tok) >= 0
              and self.lambda_value + self.lambda_embed + self.lambda_tok > 0, "lambda_value",
              "the λ weights must be >= 0 and not all 0")
        check(self.grad_clip > 0, "grad_clip", f"must be > 0, got {self.grad_clip}")


class OnPolicyLoss(NamedTuple):
    loss: Tensor  # λ_v value + λ_e embed + λ_tok token
    value_loss: Tensor  # mean (V − r)² / reward_var
    embed_loss: Tensor  # mean ‖ẽ_SVM − ẽ_RM‖²
    token_loss: Tensor  # mean (h_SVM − h_RM)²


def onpolicy_loss(value: Tensor, reward: Tensor, student_emb: Tensor, student_tok: Tensor, teacher_emb: Tensor,
                  teacher_tok: Tensor, reward_var: float, cfg: OnPolicyConfig) -> OnPolicyLoss:
    """The stage-3 loss of the module docstring. value, reward: (B,); embeddings (B, E); tokens (B, T, D);
    reward_var: the running reward variance Var(r) (a number, no gradient)."""
    value_loss = (value.float() - reward.float()).pow(2).mean() / max(reward_var, 1e-8)
    embed_loss = (F.normalize(student_emb, dim=-1) - F.normalize(teacher_emb, dim=-1)).pow(2).sum(-1).mean()
    token_loss = (student_tok - teacher_tok).pow(2).mean()
    loss = cfg.lambda_value * value_loss + cfg.lambda_embed * embed_loss + cfg.lambda_tok * token_loss
    return OnPolicyLoss(loss, value_loss, embed_loss, token_loss)


def schedule_with_nodes(base: Tensor, nodes: Tensor) -> tuple[Tensor, Tensor]:
    """Insert `nodes` (n,) in (0, 1) into the decreasing schedule `base` (N+1,); returns (schedule, their indices)."""
    merged = torch.cat([base.double(), nodes.double()]).unique().flip(0)  # decreasing, deduplicated
    index = torch.stack([torch.argmin((merged - s).abs()) for s in nodes.double()])
    return merged.float(), index


class Rollouts(NamedTuple):
    z_t: Tensor  # (B·n, C, h, w)
    sigma: Tensor  # (B·n,)
    prompts: list[str]  # (B·n,)
    images: Tensor  # (B, 3, H, W) decoded ends x0
    prompts_x0: list[str]  # (B,)
    index: Tensor  # (B·n,) row of x0 each z_t belongs to


@torch.no_grad()
def sample_rollouts(policy, prompts: list[str], num_steps: int, guidance: float, eta: float, sigmas: Tensor,
                    generator: torch.Generator) -> Rollouts:
    """One SDE trajectory per prompt through a schedule holding `sigmas`; the latents at those noise levels and
    the decoded ends."""
    from policies import samplers

    device = policy.device
    schedule, index = schedule_with_nodes(policy.sigmas(num_steps, "cpu"), sigmas)
    b, n = len(prompts), len(sigmas)
    z_T = torch.randn((b, policy.latent_channels, policy.latent_size, policy.latent_size), generator=generator)
    cuda_gen = torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    traj = samplers.sample(policy.velocity_fn(policy.encode_prompts(prompts), guidance),
                           z_T.to(device, policy.dtype), schedule.to(device), eta=eta, generator=cuda_gen)
    images = policy.decode(traj.z_tau).float()
    z_t = traj.latents[:, index.to(device)].flatten(0, 1).float()  # (b·n, C, h, w), trajectory-major
    rows = torch.arange(b).repeat_interleave(n)
    return Rollouts(z_t, schedule[index].repeat(b).to(device), [prompts[r] for r in rows.tolist()], images,
                    list(prompts), rows.to(device))


def onpolicy_finetune(model: StitchVM, policy, reward: nn.Module, prompts: list[str], cfg: OnPolicyConfig,
                      callback: Callable[[int, dict], None] | None = None, ckpt_meta: dict | None = None,
                      save_fn: Callable[[str, StitchVM, dict | None], None] = save_stitchvm,
                      target: nn.Module | None = None) -> dict[str, list]:
    """Train `model`'s stitch and tail in place on the policy's trajectories (module docstring).

    Args:
        model: a stitched critic after stage 2 (StitchVM, or vae_stitch's StitchVM with a LatentHead).
        policy: the FlowPolicy whose trajectories the critic will value (its transformer is frozen here).
        reward: the reward the critic was distilled from (teacher tower `.vision`, r(images, prompts)).
        prompts: training prompts.
        target: the reward V regresses onto (r(images, prompts) -> (B,)); None: ``reward``.
    Returns: per-step lists "onpolicy/{loss,value_loss,embed_loss,token_loss,lr,grad_norm,reward_std}".
    """
    if len(prompts) < cfg.trajectories:
        raise ValueError(f"onpolicy: {len(prompts)} prompts < trajectories = {cfg.trajectories}")
    reward.requires_grad_(False)
    policy.transformer.requires_grad_(False)
    teacher = make_tail(reward.vision, model.tail.preprocess)
    teacher.eval()
    trained, optimizer = stitch_tail_optimizer(model, cfg.lr, cfg.stitch_lr_mult, cfg.weight_decay)
    # the same warm-up / cosine law as stage 2
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, cfg.lr_decay, cfg.steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    stats: dict[str, list[float]] = {f"onpolicy/{k}": [] for k in (
        "loss", "value_loss", "embed_loss", "token_loss", "lr", "grad_norm", "reward_std", "value_mse")}
    var_ema = 0.0
    bar = tqdm(total=cfg.steps, disable=not cfg.progress, desc="stitchvm on-policy")
    for step in range(cfg.steps):
        # 1. the policy's trajectories through this step's noise levels; targets on their decoded ends
        batch = [prompts[k] for k in rng.choice(len(prompts), cfg.trajectories, replace=False)]
        num_steps = int(cfg.num_steps[rng.integers(len(cfg.num_steps))])
        guidance = float(cfg.guidance_scales[rng.integers(len(cfg.guidance_scales))])
        lo, hi = cfg.sigma_range
        sigmas = (lo + (hi - lo) * torch.rand(cfg.latents_per_trajectory, generator=generator)).clamp(1e-3, 1 - 1e-3)
        model.eval()
        roll = sample_rollouts(policy, batch, num_steps, guidance, cfg.eta, sigmas, generator)
        with torch.no_grad():
            t_out = teacher.encode(roll.images)
            r = (reward if target is None else target)(roll.images, roll.prompts_x0).float()  # (b,)
            r = r.to(roll.z_t.device)  # a checker target scores on the CPU
        var_ema, reward_var = debiased_ema(var_ema, r.var().item(), step)
        # 2. the critic on z_t
        model.train()
        s_out = model.features(roll.z_t, roll.sigma, roll.prompts)  # a prompt-conditioned head sees the prompt
        value = model.score(s_out.embed, roll.prompts).float()
        out = onpolicy_loss(value, r[roll.index], s_out.embed, s_out.tokens, t_out.embed[roll.index],
                            t_out.tokens[roll.index], reward_var, cfg)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"non-finite on-policy loss at step {step}: {out}")
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip).item()
        lr = scheduler.get_last_lr()[1]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # 3. log / checkpoint
        for name, v in out._asdict().items():
            stats[f"onpolicy/{name}"].append(v.item())
        stats["onpolicy/lr"].append(lr)
        stats["onpolicy/grad_norm"].append(grad_norm)
        stats["onpolicy/reward_std"].append(r.std().item())
        stats["onpolicy/value_mse"].append(out.value_loss.item() * max(reward_var, 1e-8))
        bar.update(1)
        bar.set_postfix(value=f"{out.value_loss.item():.3g}", embed=f"{out.embed_loss.item():.3g}")
        done = step + 1
        if callback is not None and done % cfg.log_every == 0:
            callback(done, {k: v[-1] for k, v in stats.items()})
        if cfg.ckpt_dir is not None and cfg.ckpt_every and done % cfg.ckpt_every == 0:
            save_fn(cfg.ckpt_dir, model, ckpt_meta)
    bar.close()
    model.eval()
    return stats

