"""DiffusionNFT epoch throughput at SD3.5-Medium shapes: decode-and-score (terminal) against StitchVM.

Random-initialised models of the real shapes (SD3.5-Medium MMDiT, SD3 VAE, CLIP ViT-L/14), bf16, one GPU.
One epoch = rollout (25 Euler steps, CFG-free, old adapter) -> reward -> forward-regression update, exactly the
code of rl/nft.py (``collect`` + ``optimise``):

- terminal: finish all 25 steps, decode with the VAE, score with CLIP ViT-L/14; train on 90% of 25 timesteps.
- stitchvm: stop at tau ~ U{12..17}, V(z_tau) through 4 DiT blocks + stitched ViT-L; train on 90% of the tau
  timesteps above sigma_tau (paper Eqs. 72-77).

    python benchmarks/nft_throughput.py --resolution 512 --prompts 2 --group 8 --epochs 3
    python benchmarks/nft_throughput.py --tiny          # CPU smoke test of the same code

Prints a markdown table (seconds per epoch split into rollout / value / update, samples/s, speed-up) and
writes JSON to $OUT/nft_throughput.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def build(args, critic_name: str):
    from accelerate import Accelerator

    from critics.baselines import TerminalCritic
    from critics.rewards import CLIPScore
    from critics.stitchvm import build_stitchvm
    from rl import common, nft
    from rl.metrics import MetricLogger, Timer
    import open_clip

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.tiny:
        from policies.testing import tiny_policy

        policy = tiny_policy().to(device)
        clip = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8,
                                                            head_width=16),
                              text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
        i = 1
    else:
        from policies.testing import sd35_medium_policy

        policy = sd35_medium_policy(args.resolution, dtype=dtype, device=device)
        clip = open_clip.create_model("ViT-L-14", pretrained=None)
        i = 4
    reward = CLIPScore(clip, open_clip.get_tokenizer("ViT-L-14")).to(device=device, dtype=dtype)
    if critic_name == "terminal":
        critic = TerminalCritic(policy, reward)
    else:
        null = policy.null_embeds()
        tail_width = reward.vision.transformer.width
        W = torch.randn(tail_width, policy.transformer.config.num_attention_heads
                        * policy.transformer.config.attention_head_dim, device=device) * 0.02
        critic = build_stitchvm(policy.transformer, reward, i, 1, W, torch.zeros(tail_width, device=device),
                                null.embeds, null.pooled, "prompt").to(device=device, dtype=dtype)
    cfg = nft.NFTConfig(num_steps=args.steps, tau_min=args.tau_min, tau_max=args.tau_max,
                        prompts_per_epoch=args.prompts, group_size=args.group, rollout_batch_size=args.rollout_batch,
                        train_batch_size=args.train_batch, timestep_fraction=0.9, kl_beta=0.0)
    out_dir = tempfile.mkdtemp(prefix="nft_bench_")
    run = common.Run(policy=policy, critic=critic, train_prompts=["a photo of a cat"] * 64, eval_prompts=[],
                     eval_metric=None, accelerator=Accelerator(), logger=MetricLogger(out_dir, backends=()),
                     run_cfg=common.RunConfig(output_dir=out_dir), eval_cfg=common.EvalConfig(),
                     # each section's own GPU time, as rl/train.py times them (an unsynchronised rollout would be
                     # charged to the next section that waits on it)
                     timer=Timer(cuda_sync=torch.device(device).type == "cuda"))
    optimizer, params = nft.setup_policy(run, cfg)
    return run, cfg, optimizer, params


def epoch(run, cfg, optimizer, params, k: int) -> dict[str, float]:
    from rl import nft
    from rl.advantages import group_normalize, optimality_probability

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    run.timer.reset()
    sync()
    start = time.perf_counter()
    prompts = ["a photo of a cat"] * cfg.prompts_per_epoch
    rollout = nft.collect(run, cfg, prompts, k)
    r_opt = optimality_probability(group_normalize(rollout.rewards, cfg.group_size).adv, cfg.adv_clip)
    sync()
    t_collect = time.perf_counter()
    nft.optimise(run, cfg, rollout, r_opt, optimizer, params, k)
    sync()
    end = time.perf_counter()
    split = run.timer.summary()
    return {"epoch_s": end - start, "rollout_s": split.get("time/rollout", 0.0), "value_s": split.get("time/value", 0.0),
            "update_s": end - t_collect, "samples": len(rollout.rewards)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--tau-min", type=int, default=12)
    parser.add_argument("--tau-max", type=int, default=17)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--rollout-batch", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke test)")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.tau_min, args.tau_max, args.prompts, args.group, args.epochs = 6, 3, 4, 1, 2, 1
    rows = {}
    for name in ("terminal", "stitchvm"):
        run, cfg, optimizer, params = build(args, name)
        epoch(run, cfg, optimizer, params, 0)  # warm-up (kernels, allocator)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        timings = [epoch(run, cfg, optimizer, params, k + 1) for k in range(args.epochs)]
        row = {key: sum(t[key] for t in timings) / len(timings) for key in timings[0]}
        row["samples_per_s"] = row["samples"] / row["epoch_s"]
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        rows[name] = row
        del run, optimizer, params
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    speedup = rows["terminal"]["epoch_s"] / rows["stitchvm"]["epoch_s"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\nDiffusionNFT epoch, SD3.5-M shapes at {args.resolution}^2, {args.prompts}x{args.group} samples, "
          f"{args.steps} steps, {device}\n")
    print("| critic | epoch s | rollout s | value s | update s | samples/s | peak GB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['epoch_s']:.2f} | {r['rollout_s']:.2f} | {r['value_s']:.2f} | {r['update_s']:.2f} | "
              f"{r['samples_per_s']:.2f} | {r['peak_mem_gb']:.1f} |")
    print(f"\nStitchVM speed-up per epoch: {speedup:.2f}x")
    if os.environ.get("OUT"):
        from rl.checkpoint import atomic_write_bytes

        atomic_write_bytes(Path(os.environ["OUT"], "nft_throughput.json"), json.dumps(
            {"device": device, "args": vars(args), "rows": rows, "speedup": speedup}, indent=2).encode())


if __name__ == "__main__":
    main()
