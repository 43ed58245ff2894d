"""What `run.matmul_precision` buys on the Shapes policy: the pieces of a trainer's epoch timed per precision.

    python benchmarks/matmul_precision.py                       # on a GPU: batch 1024 sampling, 512 update
    python benchmarks/matmul_precision.py --batch 8 --update-batch 8 --repeats 1   # CPU smoke test

The Shapes MMDiT (hidden 128, 8 blocks, ~96 tokens a sample) runs its matmuls in full fp32 by default. At the
trainers' batch sizes (rollouts of 1024, updates of 512) a forward is ~0.3 TFLOP, so on an H100 it may be bound by
fp32 arithmetic rather than by kernel launches; TF32 (`high`) moves those matmuls to the tensor cores. Timed, each
with the trainers' LoRA (rank 32) active, after a warm-up, synchronised:
- `sample`: 20 Euler ODE steps without gradients (rollouts outside the SDE window, evaluation);
- `update`: one forward and backward of the velocity through the LoRA at one sigma (the policy-gradient re-scoring);
- `decode`: the VAE decoder (its convolutions are TF32 under cuDNN's default already).
The bf16 row is autocast (what `run.mixed_precision=bf16` puts around rollouts and updates; evaluation runs outside
it) at full fp32 matmul precision. A last row (GPU only) is `run.cuda_graphs` at full precision: the policy replays
each sampling step's forward as a CUDA graph (FlowPolicy.enable_cuda_graphs); its update and decode columns repeat
the first row's (autograd forwards and the decoder stay eager). The last column is how far each setting's samples
land from full fp32 (relative RMS of the final latents).

Measured (session 12, one H100 80GB, batch 1024 / 512, mean of 5; docs/bench/matmul_precision_h100_session12.md):
sample 0.68 s at highest, 0.74 s at high, 0.65 s at medium and under bf16 autocast; the update's forward-backward
45 ms at highest, 55-69 ms at the others. Matmul precision buys nothing. A CUDA graph of each step's velocity (then
at TF32) sampled in 0.36 s (1.90x), but that call shared the host with two value benchmarks, which slow an eager
sampler's launches: in the trainers (alone on a card each, docs/bench/trainers_session12.md) GRPO's and DDPO's
1024-sample rollouts took as long with `run.cuda_graphs` as without, and DRaFT's 64-sample ones ran ~2.6x faster
(1.33x the epochs).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from policies import lora
from shapes import models
from shapes.data import prompts as shapes_prompts

PRECISIONS = ("highest", "high", "medium", "autocast bf16")  # the last: run.mixed_precision=bf16's autocast


def timed(fn, repeats: int, device: torch.device) -> float:
    """Seconds per call: one warm-up call, then the mean of ``repeats``."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1024, help="samples per sampling / decode call")
    p.add_argument("--update-batch", type=int, default=512, help="samples per forward-backward")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    policy = models.load_shapes_policy(device)
    lora.add_lora(policy.transformer, lora.LoraSpec(r=32, alpha=64.0, init="gaussian"))
    policy.transformer.requires_grad_(False)  # as the trainers (rl.common): weight gradients of the LoRA only
    for param in lora.adapter_parameters(policy.transformer, "default").values():
        param.requires_grad_(True)
    with torch.no_grad():  # a trained adapter is not zero: give B a trained-like size so the LoRA path counts
        for name, param in lora.adapter_parameters(policy.transformer, "default").items():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    prompts = shapes_prompts("train", args.batch, 0)
    z_T = policy.noise(args.batch, torch.Generator(device).manual_seed(0))
    cond = policy.encode_prompts(prompts[:args.update_batch])
    z_u = z_T[:args.update_batch].clone()
    sigma = torch.full((args.update_batch,), 0.7, device=device)
    params = list(lora.adapter_parameters(policy.transformer, "default").values())

    def sample():
        return policy.sample(prompts, args.steps, z_T=z_T, keep_latents=False).z_tau

    def update():
        v = policy.velocity(z_u, sigma, cond)
        v.float().square().mean().backward()
        for q in params:
            q.grad = None

    rows, finals = [], {}
    for precision in PRECISIONS:
        autocast = precision.startswith("autocast")
        torch.set_float32_matmul_precision("highest" if autocast else precision)
        with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            with torch.no_grad():
                finals[precision] = sample().float()
                z0 = finals[precision].to(policy.dtype)
            t_sample = timed(sample, args.repeats, device)
            t_update = timed(update, args.repeats, device)
            with torch.no_grad():
                t_decode = timed(lambda: policy.decode(z0), args.repeats, device)
        rows.append((precision, t_sample, t_update, t_decode))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Shapes policy + LoRA r32 on {name}: sampling {args.batch} x {args.steps} steps, update batch "
          f"{args.update_batch}, decode {args.batch}; seconds per call, mean of {args.repeats}\n")
    print("| float32 matmuls | sample | update | decode | sample speed-up | update speed-up | final latents: "
          "relative RMS to highest |")
    print("|---|---|---|---|---|---|---|")
    ref, base = finals["highest"], rows[0]

    def show(label: str, ts: float, tu: float, td: float) -> None:
        err = ((finals[label] - ref).square().mean() / ref.square().mean()).sqrt().item()
        print(f"| {label} | {ts:.4f} | {tu:.4f} | {td:.4f} | {base[1] / ts:.2f}x | {base[2] / tu:.2f}x | {err:.2e} |",
              flush=True)

    for row in rows:
        show(*row)
    if device.type == "cuda":  # the sampler is launch-bound: run.cuda_graphs replays each step's forward
        torch.set_float32_matmul_precision("highest")
        policy.enable_cuda_graphs()
        label = "highest + run.cuda_graphs"
        with torch.no_grad():
            finals[label] = sample().float()
        show(label, timed(sample, args.repeats, device), base[2], base[3])  # autograd and the decoder stay eager
        policy.enable_cuda_graphs(False)
    torch.set_float32_matmul_precision("highest")


if __name__ == "__main__":
    main()
