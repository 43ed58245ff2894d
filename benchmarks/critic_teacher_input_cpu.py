"""Does a teacher that scores D(z0), the image of the student's own clean latent, raise the critic's fidelity?
(session 21)

Stage 2 has the teacher score the clean image x0 while the student sees z_t noised from E(x0) (or from a policy
sample's own latent). The value a trainer asks for is E[r(D(z0)) | z_t], the reward of the image the policy's latent
decodes to, and the VAE round trip moves that reward: on the policy's samples r(D(E(D(z0)))) ranks as r(D(z0)) only at
ρ .967-.986. With ``distill.teacher_input: decoded`` every target is r(D(z0)) of the very z0 the student's z_t is
noised from, a function of the student's clean input.

This continues stage 2 from a shipped critic for --steps more steps per arm (teacher input × where the bank rows'
z0 starts), on the build's data mix (renders and policy samples, half each) at the critic's own noise law. Every arm
starts from the same weights and sees the same batches, σ and ε. Reported on held-out policy samples (CFG 4.5, 20
steps), per σ: std of (student − teacher) and Spearman ρ(student, teacher), with

    own:      the student on the sample's own latent z0, the teacher on D(z0)   (what the value benchmark asks)
    encoded:  the student on E(D(z0)), the teacher on D(z0)                     (sessions 19-20's screens)

    python benchmarks/critic_teacher_input_cpu.py --steps 150      # CPU: ~30 minutes
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]  # run from anywhere
from critic_own_score_cpu import (continuation_bank, continuation_parser, continuation_setup,  # noqa: E402
                                  fidelity, report)
from critics.build import ImageStream, MixedStream  # noqa: E402
from critics.distill import DistillConfig, distill  # noqa: E402
from shapes.data import prompts as shapes_prompts  # noqa: E402

ARMS = (("image", "encoded"), ("decoded", "encoded"), ("decoded", "own"), ("image", "own"))


def main(argv: list[str] | None = None) -> None:
    p = continuation_parser(__doc__.split("\n\n")[0], [0.1, 0.25])
    p.add_argument("--arms", nargs="+", default=[f"{t}/{s}" for t, s in ARMS],
                   help="TEACHER/STUDENT pairs: teacher_input image|decoded, bank rows' z0 encoded|own")
    args = p.parse_args(argv)
    arms = [tuple(a.split("/")) for a in args.arms]
    for t, s in arms:
        if t not in ("image", "decoded") or s not in ("encoded", "own"):
            raise SystemExit(f"error: arm {t}/{s}: TEACHER is image or decoded, STUDENT encoded or own")
    policy, reward, base, teacher, record, dataset = continuation_setup(args.critic)

    ps_cfg, bank, bank_latents, bank_captions = continuation_bank(policy, record, args.bank)

    sets = {}
    gen = torch.Generator().manual_seed(0)
    for name, split, seed in (("test prompts", "test", 1), ("train prompts", "train", 77)):
        prompts = shapes_prompts(split, args.n_eval, seed)
        z0 = policy.sample(prompts, num_steps=20, guidance_scale=4.5, generator=gen, keep_latents=False).z_tau.float()
        images = policy.decode(z0)
        sets[f"{name}, own"] = (images, z0, prompts)
        sets[f"{name}, encoded"] = (images, policy.encode(images).float(), prompts)

    d = record["distill"]
    results = {"shipped": {f"{s} σ{sigma:g}": fidelity(base, teacher, *sets[s], sigma)
                           for s in sets for sigma in args.sigmas}}
    for t_in, s_in in arms:
        critic = copy.deepcopy(base)
        dcfg = DistillConfig(lr=args.lr, stitch_lr_mult=d["stitch_lr_mult"], warmup_steps=10,
                             batch_size=args.batch_size, epochs=1000, max_steps=args.steps,
                             sigma_sampling=d["sigma_sampling"], sigma_mean=d["sigma_mean"], sigma_std=d["sigma_std"],
                             grad_clip=d["grad_clip"], caption_dropout=d["caption_dropout"], seed=3, progress=False,
                             log_every=max(1, args.steps // 3), teacher_input=t_in)
        # a fresh stream per arm: the streams reseed each pass, so a shared one would give later arms other batches
        stream = MixedStream(ImageStream(dataset, 64, 0, 0, captions=True), bank, ps_cfg.fraction, ps_cfg.seed,
                             bank_captions, bank_latents if s_in == "own" else None)
        t0 = time.perf_counter()
        stats = distill(critic, reward, policy.encode, stream, dcfg, decode_fn=policy.decode)
        critic.eval()
        last = {k: sum(v[-10:]) / len(v[-10:]) for k, v in stats.items() if v}
        print(f"teacher {t_in}, student {s_in}: {args.steps} steps in {time.perf_counter() - t0:.0f} s; last 10: "
              f"embed {last['distill/embed_loss']:.4f}, token {last['distill/token_loss']:.4f}", flush=True)
        results[f"+{args.steps} steps, teacher {t_in}, bank z0 {s_in}"] = {
            f"{s} σ{sigma:g}": fidelity(critic, teacher, *sets[s], sigma) for s in sets for sigma in args.sigmas}
    report(results, "the teacher on D(z0)", args)

if __name__ == "__main__":
    main()
