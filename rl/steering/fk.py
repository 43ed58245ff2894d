"""Feynman-Kac steering with a value model (Singhal et al., arXiv 2501.06848; StitchVM paper Table 2, Alg. 1).

N particles per prompt follow the policy's SDE (Flow-GRPO step, policies/samplers.py). At resampling steps each
particle is weighted by a potential built from the critic's value V(z_{t_k}) and the population is resampled
when its effective sample size falls below a threshold; StitchVM's *proposal scaling* additionally lets every
particle draw M transitions at the early steps and keep the one with the largest V. Gradient-free.

Potentials (log-space, lambda = ``lam``, V_k = V(z_{t_k}) of a particle, products along its ancestry):
    difference  log G_k = lambda (V_k - V_{k'})          k' = the previous evaluation (V before the first = 0)
    max         log G_k = lambda max_{s <= k} V_s
    sum         log G_k = lambda sum_{s <= k} V_s
    final       log G_K = lambda V(z_0) - sum_{k < K} log G_k       (all types)
The final correction makes the product of potentials along every lineage exp(lambda V(z_0)), so the weighted
particles target p(z_0) exp(lambda r(z_0)) for all three (for "difference" it is just the next difference).

Weights: log w <- log w + log G_k at every evaluation; the normalised weights w_hat = softmax(log w) and
ESS = (sum w)^2 / sum w^2 = 1 / sum w_hat^2 never exponentiate a raw log-weight, so potentials of +-1e4 stay
finite. Resample (systematic by default, or multinomial) when ESS < ``ess_threshold`` * N, then
reset log w to 0. Resampling draws use their own RNG (``seed``), never the SDE noise generator, so with N = 1
and M = 1 FK is plain SDE sampling exactly.

Proposal scaling (StitchVM): on the first ceil(``proposal_fraction`` * K) steps each particle draws M proposals
z_{k+1}^(m) from the same transition kernel and keeps argmax_m V(z_{k+1}^(m)); V of the kept proposal is reused
as the next step's V_k (no second evaluation). No importance correction is applied for this greedy choice (as
in the paper): it trades exactness of the FK target for reward.

Output: per prompt, the particle with the largest final value (``select="best"``, FK steering's usual choice)
or one drawn from the final weights (``select="sample"``).

With SharedHeadGuide, V(z_k) of the particles comes out of the CFG forward that the step needs anyway (stitch +
tail only); proposals cost i head blocks + tail each, never a full DiT forward or a VAE decode.

    symbol         here              shape
    N, M           num_particles, num_proposals
    P              number of prompts
    z              z                 (P*N, C, h, w)   particle n of prompt p at row p*N + n
    log w          log_w             (P, N)
    V_k            value             (P*N,)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import torch
from torch import Tensor

from policies import samplers
from policies.flow import PromptEmbeds
from rl.config import check, option
from rl.steering.guides import Guide

Potential = Literal["difference", "max", "sum"]


@dataclass
class FKConfig:
    """FK steering hyper-parameters (paper Table 2: N = 4, M = 2, proposals on the first 40% of 40 steps)."""

    num_particles: int = option(4, help="N, particles per prompt")
    num_proposals: int = option(2, help="M, transitions drawn per particle at proposal steps (1 = off)")
    proposal_fraction: float = option(0.4, help="proposal scaling on the first ceil(fraction * K) steps")
    potential: Potential = option("difference", help="'difference', 'max' or 'sum' (module docstring)")
    lam: float = option(10.0, help="lambda: potential temperature, G = exp(lambda * ...)")
    ess_threshold: float = option(0.5, help="resample when ESS < threshold * N (1.0: every evaluation)")
    resample_every: int = option(1, help="evaluate potentials every this many steps")
    resampling: Literal["systematic", "multinomial"] = option("systematic", help="resampling scheme")
    eta: float = option(0.7, help="SDE noise level of the transitions (> 0 unless N = M = 1)")
    select: Literal["best", "sample"] = option("best", help="output particle: largest final V, or drawn by weight")
    seed: int = option(0, help="seed of the resampling / selection RNG (separate from the SDE noise)")

    def __post_init__(self):
        check(self.num_particles >= 1, "num_particles", f"must be >= 1, got {self.num_particles}")
        check(self.num_proposals >= 1, "num_proposals", f"must be >= 1, got {self.num_proposals}")
        check(0 <= self.proposal_fraction <= 1, "proposal_fraction", f"must be in [0, 1], got {self.proposal_fraction}")
        check(self.resample_every >= 1, "resample_every", f"must be >= 1, got {self.resample_every}")
        check(self.ess_threshold >= 0, "ess_threshold", f"must be >= 0, got {self.ess_threshold}")
        check(self.eta > 0 or (self.num_particles == 1 and self.num_proposals == 1), "eta",
              "FK needs stochastic transitions (eta > 0) when N > 1 or M > 1: with the ODE all particles coincide")

    def proposal_steps(self, num_steps: int) -> int:
        return math.ceil(self.proposal_fraction * num_steps) if self.num_proposals > 1 else 0


# ---------------------------------------------------------------------------------------------------------------
# Weights and resampling (pure functions of log-weights)
# ---------------------------------------------------------------------------------------------------------------
def normalized_weights(log_w: Tensor) -> Tensor:
    """softmax over the last dim (particles), float32: finite and summing to 1 for any finite log-weights."""
    return torch.softmax(log_w.float(), dim=-1)


def effective_sample_size(log_w: Tensor) -> Tensor:
    """ESS = (sum w)^2 / sum w^2 = 1 / sum w_hat^2 over the last dim: (..., N) -> (...), in [1, N].

    From the softmax-normalised weights: exp(2 LSE(log w) - LSE(2 log w)) is the same number but cancels
    catastrophically in float32 when |log w| ~ 1e4 (ulp(2e4) ~ 2e-3).
    """
    return 1.0 / normalized_weights(log_w).pow(2).sum(-1)


def resample_indices(log_w: Tensor, scheme: str, generator: torch.Generator | None = None) -> Tensor:
    """Ancestor indices (P, N) in 0..N-1 drawn from the normalised weights of each row of log_w (P, N).

    systematic: one uniform u per row, points (u + n) / N on the weights' CDF (low variance; an index with weight
    w appears floor(N w) or ceil(N w) times). multinomial: N independent draws.
    """
    weights = normalized_weights(log_w).cpu()
    P, N = weights.shape
    if scheme == "multinomial":
        return torch.multinomial(weights, N, replacement=True, generator=generator)
    if scheme != "systematic":
        raise ValueError(f"resampling must be 'systematic' or 'multinomial', got {scheme!r}")
    points = (torch.rand(P, 1, generator=generator) + torch.arange(N)) / N  # (P, N) in [0, 1)
    cdf = weights.cumsum(-1)
    return torch.searchsorted(cdf, points).clamp_max(N - 1)  # clamp: float round-off can leave cdf[-1] < 1


class Potentials:
    """Per-particle potential state: log G_k from V_k, and the running sum of log G along each lineage."""

    def __init__(self, kind: Potential, lam: float, num: int, device: torch.device):
        if kind not in ("difference", "max", "sum"):
            raise ValueError(f"potential must be 'difference', 'max' or 'sum', got {kind!r}")
        self.kind, self.lam = kind, float(lam)
        self.prev = torch.zeros(num, device=device)  # V at the previous evaluation (difference)
        self.run_max = torch.full((num,), -math.inf, device=device)
        self.run_sum = torch.zeros(num, device=device)
        self.log_prod = torch.zeros(num, device=device)  # sum of log G_k along the lineage

    def step(self, value: Tensor) -> Tensor:
        """log G_k for V_k = ``value`` (P*N,), and update the state."""
        if not torch.isfinite(value).all():
            raise FloatingPointError("non-finite critic value in FK steering: check the critic's inputs")
        if self.kind == "difference":
            log_g = self.lam * (value - self.prev)
        elif self.kind == "max":
            self.run_max = torch.maximum(self.run_max, value)
            log_g = self.lam * self.run_max
        else:
            self.run_sum = self.run_sum + value
            log_g = self.lam * self.run_sum
        self.prev = value
        self.log_prod = self.log_prod + log_g
        return log_g

    def final(self, value: Tensor) -> Tensor:
        """log G_K = lambda V(z_0) - sum of previous log G: the lineage's product becomes exp(lambda V(z_0))."""
        return self.lam * value - self.log_prod

    def index(self, rows: Tensor) -> None:
        self.prev, self.run_max = self.prev[rows], self.run_max[rows]
        self.run_sum, self.log_prod = self.run_sum[rows], self.log_prod[rows]


# ---------------------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------------------
class FKResult(NamedTuple):
    """Attributes:
        z_0: (P, C, h, w) the selected particle per prompt.
        particles: (P, N, C, h, w) all final particles.
        log_weights: (P, N) final log-weights (after the final potential).
        values: (P, N) V(z_0) of the particles.
        ess: (P, K) ESS before each step's resampling decision (NaN where potentials were not evaluated).
        num_resampled: how many (prompt, step) resampling events happened.
    """

    z_0: Tensor
    particles: Tensor
    log_weights: Tensor
    values: Tensor
    ess: Tensor
    num_resampled: int


def fk_sample(guide: Guide, z_T: Tensor, sigmas: Tensor, cond: PromptEmbeds, prompts: Sequence[str], cfg: FKConfig,
              generator: torch.Generator | None = None) -> FKResult:
    """FK steering for P prompts with N particles each.

    Args:
        guide: gives the CFG velocity and V (rl/steering/guides.py); no gradients are taken.
        z_T: (P*N, C, h, w) initial noise, particle n of prompt p at row p*N + n.
        sigmas: (K+1,) decreasing schedule ending at 0.
        cond: P prompt embeddings.  prompts: P strings.
        generator: RNG of the SDE noise (resampling uses its own, seeded by ``cfg.seed``).
    """
    N, M, P = cfg.num_particles, cfg.num_proposals, len(prompts)
    if z_T.shape[0] != P * N or len(cond) != P:
        raise ValueError(f"FK with {P} prompts and N = {N} needs z_T of {P * N} rows and {P} embeddings; got "
                         f"{z_T.shape[0]} and {len(cond)}")
    device = z_T.device
    rng = torch.Generator().manual_seed(cfg.seed)
    num_steps = sigmas.numel() - 1
    n_proposal = cfg.proposal_steps(num_steps)
    cond_p = cond.repeat(N)  # (P*N) rows, prompt-major like z
    prompts_p = [p for p in prompts for _ in range(N)]
    potentials = Potentials(cfg.potential, cfg.lam, P * N, device)
    log_w = torch.zeros(P, N, device=device)
    ess_log = torch.full((P, num_steps), math.nan)
    offsets = (torch.arange(P, device=device) * N).view(P, 1)
    sigma_at_one = sigmas[1]
    num_resampled = 0
    z, known_value = z_T, None  # V of z when the proposal step already computed it
    steered = N > 1 or M > 1  # with one particle and one proposal FK is plain sampling: no value is needed
    for k in range(num_steps):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        evaluate = steered and N > 1 and k % cfg.resample_every == 0
        out = guide(z, sigma.expand(z.shape[0]).to(device), cond_p, prompts_p,
                    need_value=evaluate and known_value is None, need_grad=False)
        v = out.velocity
        # 1. Potentials at z_k, weights, adaptive resampling (the velocity is a function of z_k: gather it too).
        if evaluate:
            value = known_value if known_value is not None else out.value
            log_w = log_w + potentials.step(value).view(P, N)
            ess = effective_sample_size(log_w)
            ess_log[:, k] = ess.cpu()
            low = ess < cfg.ess_threshold * N
            if low.any():
                idx = torch.arange(N, device=device).expand(P, N).clone()
                idx[low] = resample_indices(log_w[low], cfg.resampling, rng).to(device)
                rows = (idx + offsets).flatten()
                z, v = z[rows], v[rows]
                potentials.index(rows)
                log_w = torch.where(low.view(P, 1), torch.zeros_like(log_w), log_w)
                num_resampled += int(low.sum())
        known_value = None
        # 2. Transition; at proposal steps M draws per particle and keep argmax V.
        if k < n_proposal:
            step = samplers.sde_step(v.repeat(M, 1, 1, 1), z.repeat(M, 1, 1, 1), sigma, sigma_next, cfg.eta,
                                     generator=generator, sigma_at_one=sigma_at_one)
            cand = step.prev_sample  # (M*P*N, ...), proposal m of particle j at row m*P*N + j
            cand_v = guide.values(cand, sigma_next.expand(cand.shape[0]).to(device), _repeat_rows(cond_p, M),
                                  prompts_p * M).view(M, P * N)
            best = cand_v.argmax(0)  # (P*N,)
            rows = best * (P * N) + torch.arange(P * N, device=device)
            z, known_value = cand[rows], cand_v.gather(0, best.view(1, -1)).squeeze(0)
        else:
            z = samplers.sde_step(v, z, sigma, sigma_next, cfg.eta, generator=generator,
                                  sigma_at_one=sigma_at_one).prev_sample
    # 3. Final potential at z_0 and the output particle per prompt.
    if steered:
        final_v = known_value if known_value is not None else guide.values(
            z, torch.zeros(z.shape[0], device=device), cond_p, prompts_p)
        log_w = log_w + potentials.final(final_v).view(P, N)
        final_v = final_v.view(P, N)
    else:
        final_v = torch.full((P, N), math.nan, device=device)
    if N == 1:
        pick = torch.zeros(P, dtype=torch.long, device=device)
    elif cfg.select == "best":
        pick = final_v.argmax(-1)
    else:
        pick = torch.multinomial(normalized_weights(log_w).cpu(), 1, generator=rng).squeeze(-1).to(device)
    particles = z.view(P, N, *z.shape[1:])
    return FKResult(particles[torch.arange(P, device=device), pick], particles, log_w, final_v, ess_log, num_resampled)


def _repeat_rows(cond: PromptEmbeds, times: int) -> PromptEmbeds:
    """All rows ``times`` times, block after block (matches ``Tensor.repeat`` of the latents)."""
    return PromptEmbeds(cond.embeds.repeat(times, 1, 1), cond.pooled.repeat(times, 1))
