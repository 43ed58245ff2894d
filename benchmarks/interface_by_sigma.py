"""Stage-1 fit error per noise level: does the best DiT head depth i change with σ? (session-9 diagnostic)

The paper's interface search (critics.interface.search) fits Eq. 7 on probes noised at t ~ U[0, 1]. A low-σ expert
only ever sees small σ, where a shallower head might keep more of the image. Here the same 200 Shapes probes are
noised at one fixed σ at a time and the relative fit MSE is printed for every i in 1..8 and j in {1, 4}, with the
head on null text and on each probe's caption. CPU: ~5 minutes.

    python benchmarks/interface_by_sigma.py [--probes 200] [--sigmas 0.05,0.1,0.25,0.5,0.75,0.9]
"""

from __future__ import annotations

import argparse

import torch

from critics.build import caption_of, collate_images, encode_images, first_items, load_config
from critics.interface import search
from critics.load import reward_preprocess
from critics.stitchvm import DiTHead, HeadText
from critics.tails import make_tail
from rl.config import instantiate

BUILD_YAML = "configs/critic/build_shapes.yaml"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probes", type=int, default=200)
    p.add_argument("--sigmas", default="0.05,0.1,0.25,0.5,0.75,0.9")
    args = p.parse_args(argv)
    cfg = load_config(BUILD_YAML, [])
    policy = instantiate(cfg.policy, _path="policy")
    reward = instantiate(cfg.reward, _path="reward").requires_grad_(False)
    teacher = make_tail(reward.vision, reward_preprocess(reward))
    probes = first_items(instantiate(cfg.data, _path="data"), args.probes)
    images = collate_images(probes)
    latents = encode_images(policy, images, 50)
    null = policy.null_embeds()
    depth = len(policy.transformer.transformer_blocks)
    head = DiTHead(policy.transformer, depth, null.embeds, null.pooled, policy.latent_size)
    captions = HeadText(policy.encode_prompts)([caption_of(item) for item in probes])
    i_values = list(range(1, depth + 1))
    print("| head text | σ | " + " | ".join(f"i={i}" for i in i_values) + " | best (i, j) |")
    print("|---|---|" + "---|" * len(i_values) + "---|")
    for text, cond in (("null", None), ("caption", captions)):
        for sigma in (float(s) for s in args.sigmas.split(",")):
            t = torch.full((len(probes),), sigma, dtype=torch.float64)
            r = search(head, teacher, images, latents, i_values, [1, 4], None, t, torch.Generator().manual_seed(0),
                       50, "rel_mse", cond=cond)
            cells = " | ".join(f"{float(r.rel_mse[a, 0]):.3f} / {float(r.rel_mse[a, 1]):.3f}"
                               for a in range(len(i_values)))
            print(f"| {text} | {sigma:g} | {cells} | {r.best} |", flush=True)


if __name__ == "__main__":
    main()
