"""Does the frozen DiT head drop what the reward sees in the policy's own images? (session-14 diagnostic)

Session 8 found the low-σ expert 2.7x less precise on the policy's samples than on renders, even for train prompts
it saw in stage 2 (error std 0.032 against 0.012). One explanation: block i of a denoiser represents where the
latent will be denoised to, not the off-manifold detail (off-palette fills, soft edges) that the pixel reward
penalises; then no stitch or tail trained on the head's features can recover it. Test: the closed-form interface
fit (Eq. 7) of the reward's stem tokens (j = 1) from the head's block-i features alone, from the raw noisy latent
z_t alone (its 4x4 neighbourhood around each tail patch), and from both, fitted on renders and on policy samples
together and scored on held-out halves of each. If the latent adds much on the policy samples and little on renders,
the head is the bottleneck there and a latent skip into the stitch is worth a build. CPU: ~3 minutes.

    python benchmarks/critic_latent_skip.py [--n 256] [--sigmas 0.1,0.25,0.5] [--i 7]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from critics.build import caption_of, collate_images, encode_images, first_items, load_config
from critics.interface import fit_linear
from critics.load import reward_preprocess
from critics.stitchvm import DiTHead, HeadText, grid_to_tokens, resample_grid
from critics.tails import make_tail
from rl.config import instantiate
from shapes.data import prompts as shapes_prompts

BUILD_YAML = "configs/critic/build_shapes.yaml"


def latent_neighbourhoods(z_t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, gh*gw, C*4*4): each tail patch's 4x4 latent neighbourhood (its 2x2 footprint and a ring)."""
    sh, sw = z_t.shape[-2] // grid[0], z_t.shape[-1] // grid[1]
    cols = F.unfold(z_t, kernel_size=(2 * sh, 2 * sw), stride=(sh, sw), padding=(sh // 2, sw // 2))
    return cols.transpose(1, 2)


@torch.no_grad()
def features(head, tail, images, latents, cond, sigma, i, gen):
    """Rows (B*N_tok, .) of head block-i tokens, latent neighbourhoods and the tail's stem tokens at noise σ."""
    hs, zs, ys = [], [], []
    for s in range(0, images.shape[0], 32):
        z0 = latents[s:s + 32]
        eps = torch.randn(z0.shape, generator=gen)
        z_t = (1 - sigma) * z0 + sigma * eps
        c = tuple(x[s:s + 32] for x in cond)
        h = head.forward_taps(z_t, torch.full((z0.shape[0],), sigma), [i], c)[i]
        hs.append(grid_to_tokens(resample_grid(h, tail.grid)).flatten(0, 1))
        zs.append(latent_neighbourhoods(z_t, tail.grid).flatten(0, 1))
        ys.append(tail.prefixes(tail.preprocess(images[s:s + 32]), [1])[1].tokens.flatten(0, 1))
    return torch.cat(hs), torch.cat(zs), torch.cat(ys)


def held_out_rel_mse(fit, X, Y) -> float:
    resid = X.double() @ fit.W.T + fit.b - Y.double()
    return (resid.pow(2).mean() / Y.double().var(dim=0, unbiased=False).mean()).item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256, help="renders and policy samples each (half fit, half held out)")
    p.add_argument("--sigmas", default="0.1,0.25,0.5")
    p.add_argument("--i", type=int, default=7, help="head depth (the shipped experts: 7)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = load_config(BUILD_YAML, [])
    policy = instantiate(cfg.policy, _path="policy").eval().requires_grad_(False)
    reward = instantiate(cfg.reward, _path="reward").requires_grad_(False)
    tail = make_tail(reward.vision, reward_preprocess(reward))
    items = first_items(instantiate(cfg.data, _path="data"), args.n)
    renders, r_caps = collate_images(items), [caption_of(it) for it in items]
    s_caps = shapes_prompts("train", args.n, 5)
    gen = torch.Generator().manual_seed(0)
    traj = policy.sample(s_caps, num_steps=20, guidance_scale=4.5, generator=gen, keep_latents=False)
    samples = policy.decode(traj.z_tau).clamp(0, 1)
    null = policy.null_embeds()
    head = DiTHead(policy.transformer, args.i, null.embeds, null.pooled, policy.latent_size)
    text = HeadText(policy.encode_prompts)
    sets = {"renders": (renders, encode_images(policy, renders, 64), text(r_caps)),
            "policy samples": (samples, encode_images(policy, samples, 64), text(s_caps))}
    half = args.n // 2 * tail.num_tokens  # rows of the first half of each set's images
    print("| σ | regressors | renders: held-out rel. MSE | policy samples: held-out rel. MSE |")
    print("|---|---|---|---|")
    for sigma in (float(s) for s in args.sigmas.split(",")):
        rows = {name: features(head, tail, *v, sigma, args.i, torch.Generator().manual_seed(1))
                for name, v in sets.items()}
        for label, pick in (("head block i", lambda h, z: h), ("latent 4x4", lambda h, z: z),
                            ("head + latent", lambda h, z: torch.cat([h, z], 1))):
            X = {n: pick(h, z) for n, (h, z, _) in rows.items()}
            fit = fit_linear(torch.cat([X[n][:half] for n in X]), torch.cat([rows[n][2][:half] for n in X]))
            cells = " | ".join(f"{held_out_rel_mse(fit, X[n][half:], rows[n][2][half:]):.3f}" for n in X)
            print(f"| {sigma:g} | {label} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
