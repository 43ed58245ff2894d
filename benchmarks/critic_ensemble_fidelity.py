"""Does averaging the scores of independently built StitchVM critics raise their fidelity to the teacher reward?

For each noise level and each set of images (renders, the policy's samples on train- and test-split prompts, as in
benchmarks/critic_error_split.py), every critic values the SAME noise draw z_t (split() with one generator seed per
set), and the teacher scores x0. Reported for each critic alone and for the mean of the critics' scores: Spearman ρ
against the teacher and the std of (score − teacher); and for each pair, the Pearson correlation of their errors
(score − teacher): with error stds s1, s2 and correlation c, the mean's error std is ½·sqrt(s1² + s2² + 2·c·s1·s2),
so averaging gains only where c is well below 1. All critics must be j = 1 (critic_error_split.split).

Session 20 (CPU, 2 minutes) compared the shipped low-σ expert with its 0-block predecessor from git (written to the
ignored runs/) and the uniform expert:

    mkdir -p runs/low_v0 && for f in $(git ls-tree --name-only 4371f3c shapes/weights/stitchvm_prompt_low/); do
        git show 4371f3c:$f > runs/low_v0/$(basename $f); done
    python benchmarks/critic_ensemble_fidelity.py --n 256 --sigmas 0.1 0.25 \
        --critic low=shapes/weights/stitchvm_prompt_low --critic low_v0=runs/low_v0 \
        --critic uniform=shapes/weights/stitchvm_prompt --ensembles low+low_v0 low+uniform low+low_v0+uniform
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]  # run from anywhere
from critic_error_split import image_sets, split  # noqa: E402

from critics import load  # noqa: E402
from critics.load import reward_preprocess  # noqa: E402
from critics.stitchvm import HeadText  # noqa: E402
from critics.tails import make_tail  # noqa: E402
from shapes import models  # noqa: E402

DEFAULT_CRITICS = ["low=shapes/weights/stitchvm_prompt_low", "uniform=shapes/weights/stitchvm_prompt"]


def fidelity(score: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    return {"rho": float(spearmanr(score, teacher).statistic), "std": float((score - teacher).std())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="images per set")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.25])
    ap.add_argument("--critic", action="append", default=None, help="NAME=PATH of a j = 1 critic (repeat)")
    ap.add_argument("--ensembles", nargs="*", default=["low+uniform"],
                    help="critic names joined by '+': the mean of their scores")
    ap.add_argument("--no-renders", action="store_true", help="only the policy's samples")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    specs = dict(s.split("=", 1) for s in (args.critic or DEFAULT_CRITICS))
    ensembles = {e: e.split("+") for e in args.ensembles}
    unknown = sorted({m for members in ensembles.values() for m in members} - set(specs))
    if unknown:
        raise SystemExit(f"error: --ensembles name critics not given with --critic: {unknown}; given: {list(specs)}")
    t0 = time.time()
    torch.manual_seed(0)
    policy = models.load_shapes_policy().eval().requires_grad_(False)
    reward = models.load_shapes_reward()
    text = HeadText(policy.encode_prompts)
    critics = {name: load.stitchvm(policy, reward, path, head_text=text).eval() for name, path in specs.items()}
    for name, c in critics.items():
        if c.j != 1:
            raise SystemExit(f"error: critic {name} stitches at j = {c.j}; split() needs j = 1")
    teacher = make_tail(reward.vision, reward_preprocess(reward))
    sets = {k: (x, p, policy.encode(x).float())  # the same images as critic_error_split
            for k, (x, p) in image_sets(policy, args.n, renders=not args.no_renders).items()}
    print(f"# loaded + sampled in {time.time() - t0:.0f}s", flush=True)

    rows = list(critics) + [f"mean({e})" for e in ensembles]
    result = {"n": args.n, "critics": specs, "sigmas": {}}
    for sigma in args.sigmas:
        result["sigmas"][str(sigma)] = per_set = {}
        for set_name, (images, prompts, latents) in sets.items():
            # one fresh generator per critic with the same seed: split() draws the same z_t for every critic
            out = {n: split(c, teacher, images, latents, prompts, sigma, torch.Generator().manual_seed(1))
                   for n, c in critics.items()}
            t = out[next(iter(critics))]["teacher"]
            for n in critics:
                gap = (out[n]["teacher"] - t).abs().max().item()
                if gap > 1e-4:
                    raise SystemExit(f"error: teacher scores differ between critics ({n}: {gap:.2e})")
            scores = {n: out[n]["student"] for n in critics}
            for e, members in ensembles.items():
                scores[f"mean({e})"] = torch.stack([scores[m] for m in members]).mean(0)
            err = {n: scores[n] - t for n in critics}
            per_set[set_name] = {
                "teacher_std": float(t.std()),
                "fidelity": {r: fidelity(scores[r], t) for r in rows},
                "error_corr": {f"{a}~{b}": float(torch.corrcoef(torch.stack([err[a], err[b]]))[0, 1])
                               for a, b in itertools.combinations(critics, 2)},
                "error_mean": {n: float(err[n].mean()) for n in critics},
            }
            print(f"# σ {sigma:g} {set_name} done at {time.time() - t0:.0f}s", flush=True)

    set_names = list(sets)
    print(f"\n{args.n} images per set; Spearman ρ vs the teacher / std of (score − teacher); same z_t for all critics\n")
    print("| σ | critic | " + " | ".join(set_names) + " |")
    print("|---|---|" + "---|" * len(set_names))
    for sigma in args.sigmas:
        per_set = result["sigmas"][str(sigma)]
        for r in rows:
            cells = [f"{per_set[s]['fidelity'][r]['rho']:.3f} / {per_set[s]['fidelity'][r]['std']:.4f}"
                     for s in set_names]
            print(f"| {sigma:g} | {r} | " + " | ".join(cells) + " |")
    print("\nPearson correlation of the critics' errors (score − teacher)\n")
    pairs = list(result["sigmas"][str(args.sigmas[0])][set_names[0]]["error_corr"])
    print("| σ | pair | " + " | ".join(set_names) + " |")
    print("|---|---|" + "---|" * len(set_names))
    for sigma in args.sigmas:
        per_set = result["sigmas"][str(sigma)]
        for pr in pairs:
            print(f"| {sigma:g} | {pr} | " + " | ".join(f"{per_set[s]['error_corr'][pr]:.3f}" for s in set_names) + " |")
    result["runtime_s"] = time.time() - t0
    print(f"\nruntime {result['runtime_s']:.0f}s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
