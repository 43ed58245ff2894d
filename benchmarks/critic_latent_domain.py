"""Does the StitchVM see another latent domain at run time than in stage 2? (session-9 diagnostic)

Stage 2 builds the student's z_t from z0 = E(x0). For a policy sample x0 = D(z0_policy), that is E(D(z0_policy)),
not the policy's own z0_policy, which is what trainers and the value benchmark give the critic. Here, for ``--n``
train- and test-split prompts (one Euler-ODE sample each, the policy's steps and CFG), both latents are
forward-noised with the same ε to each σ and valued; the reference is the teacher's reward of the decoded sample
r(D(z0_policy)). Printed: the relative distance |E(D(z0)) - z0| / |z0| and, per σ and critic, Spearman ρ, error std
and bias against the reference for either latent. CPU: ~2 minutes at the defaults.

    python benchmarks/critic_latent_domain.py [--n 128] [--sigmas 0.05,0.1,0.25]
"""

from __future__ import annotations

import torch

from critic_split_gap import SPLIT_SEEDS, load_world, parse_args  # this directory (run as a script)
from critics import bench_value as bv
from shapes.data import prompts as shapes_prompts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, "0.05,0.1,0.25", argv)
    sigmas, dev, b = args.sigmas, args.device, args.batch_size
    policy, reward, cfg, critics = load_world(dev)
    print("| split | σ | critic | ρ: own z0 / E(D(z0)) | err std: own / E(D(z0)) | bias: own / E(D(z0)) |")
    print("|---|---|---|---|---|---|")
    for split, seed in SPLIT_SEEDS.items():
        prompts = shapes_prompts(split, args.n, seed)
        z0 = bv.trajectory_latents(policy, prompts, (0.0,), cfg.num_steps, cfg.guidance_scale, b)[0.0]
        with torch.no_grad():
            x0 = torch.cat([policy.decode(z0[s:s + b].to(dev)) for s in range(0, args.n, b)])
            round_trip = torch.cat([policy.encode(x0[s:s + b]) for s in range(0, args.n, b)]).cpu()
            truth = torch.cat([reward(x0[s:s + b], prompts[s:s + b]) for s in range(0, args.n, b)]).float().cpu()
        dist = ((round_trip - z0).flatten(1).norm(dim=1) / z0.flatten(1).norm(dim=1)).mean().item()
        print(f"| {split} | – | \\|E(D(z0)) − z0\\| / \\|z0\\| = {dist:.3f} | | | |")
        eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
        for sigma in sigmas:
            for name, critic in critics.items():
                cells = []
                for z in (z0, round_trip):
                    v = bv.batched_values(critic.value, (1 - sigma) * z + sigma * eps, sigma, prompts, b, dev)[0]
                    cells.append((bv.spearman(v, truth), (v - truth).std().item(), (v - truth).mean().item()))
                (r0, s0, m0), (r1, s1, m1) = cells
                print(f"| {split} | {sigma:g} | {name} | {r0:.3f} / {r1:.3f} | {s0:.3f} / {s1:.3f} | "
                      f"{m0:+.3f} / {m1:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
