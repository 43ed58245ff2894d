"""What does a unit-norm embedding cost the value at σ ≥ 0.5? The ranking ceiling of stage 2's read-out (session 19)

Stage 2 regresses the student's *normalised* embedding u onto the teacher's ẽ(x0); at a noisy z_t the minimiser of
E‖u − ẽ‖² over unit vectors is u* = E[ẽ | z_t] / ‖E[ẽ | z_t]‖, and the critic reads V = s·cos(u*, t). The value
is E[r | z_t] = s·E[ẽ | z_t]·t̂ (the score is linear in ẽ; before any clamp), so the unit-norm read-out drops the
factor ‖E[ẽ | z_t]‖, which is small where the posterior over x0 is broad. This measures the ceiling each read-out
could reach, with no student at all: on the benchmark's trajectories (critics.bench_value's protocol: ODE
trajectories of held-out prompts, the latent at exactly σ), 2K SDE rollouts per latent give the teacher embeddings
ẽ_k of their images; from one half A,

    mean read-out       s·mean_A(ẽ)·t̂ = V_A, the MC value itself (what a student regressing ẽ without
                        normalising could converge to)
    direction read-out  s·cos(mean_A(ẽ), t), what the shipped loss converges to

each ranked (Spearman) against the other half's V_B. The gap between the two rows is what the normalisation costs
an ideal student; their split-half noise is the same.

    python benchmarks/critic_direction_ceiling.py --n 64 --rollouts 8 --sigmas 0.5 0.75 0.9   # CPU, ~10 minutes
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

from critics.baselines import MonteCarloCritic
from critics.bench_value import MC_ETA, spearman, trajectory_latents
from policies import samplers
from shapes import models
from shapes.data import prompts as shapes_prompts


@torch.no_grad()
def rollout_embeds(policy, reward, z_t: torch.Tensor, sigma: float, prompts: list[str], k: int, num_steps: int,
                   guidance: float, seed: int, batch: int = 32) -> torch.Tensor:
    """(N, k, E) normalised teacher image embeddings of k SDE rollouts from each z_t to σ 0."""
    schedule = MonteCarloCritic(policy, reward, num_steps=num_steps).schedule_from(sigma, policy.device)
    gen = torch.Generator(policy.device).manual_seed(seed)
    out = []
    for s in range(0, z_t.shape[0], batch):
        p = prompts[s:s + batch]
        z = z_t[s:s + batch].to(policy.device, policy.dtype).repeat_interleave(k, 0)
        cond = policy.encode_prompts(p).repeat(k)
        traj = samplers.sample(policy.velocity_fn(cond, guidance), z, schedule, eta=MC_ETA, generator=gen,
                               keep_latents=False)
        emb = F.normalize(reward.image_embed(policy.decode(traj.z_tau).clamp(0, 1)).float(), dim=-1)
        out.append(emb.view(len(p), k, -1).cpu())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="held-out prompts (one trajectory each)")
    ap.add_argument("--rollouts", type=int, default=16, help="2K: two halves of K")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9])
    ap.add_argument("--prompt-seed", type=int, default=1, help="1: the validation prompts of critics.bench_value")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    policy = models.load_shapes_policy().eval().requires_grad_(False)
    reward = models.load_shapes_reward()
    cfg = models.policy_config(None)
    prompts = shapes_prompts("test", args.n, args.prompt_seed)
    latents = trajectory_latents(policy, prompts, args.sigmas, cfg.num_steps, cfg.guidance_scale, 128)
    with torch.no_grad():
        text = reward.text_embed(prompts).float()
    k = args.rollouts // 2
    print(f"{args.n} prompts (test split, seed {args.prompt_seed}), {args.rollouts} rollouts per latent (halves of "
          f"{k}), CFG {cfg.guidance_scale:g}, {cfg.num_steps} steps\n")
    print("| σ | split-half ρ(V_A, V_B) = mean read-out | direction read-out ρ(dir_A, V_B) | ‖mean ẽ‖: mean (std) |")
    print("|---|---|---|---|")
    for sigma in args.sigmas:
        emb = rollout_embeds(policy, reward, latents[sigma], sigma, prompts, args.rollouts, cfg.num_steps,
                             cfg.guidance_scale, seed=101)
        a, b = emb[:, :k], emb[:, k:]
        score = lambda e: reward.score_from_embeds(e, text)  # noqa: E731 (per-sample score of (N, E) embeddings)
        v_a = torch.stack([score(a[:, j]) for j in range(k)], 1).mean(1)
        v_b = torch.stack([score(b[:, j]) for j in range(k)], 1).mean(1)
        dir_a = score(a.mean(1))
        norm = emb.mean(1).norm(dim=-1)
        print(f"| {sigma:g} | {spearman(v_a, v_b):.3f} | {spearman(dir_a, v_b):.3f} | {norm.mean():.3f} "
              f"({norm.std():.3f}) |", flush=True)


if __name__ == "__main__":
    main()
