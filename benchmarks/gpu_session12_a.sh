#!/usr/bin/env bash
# Next GPU call for issue #6 (written in session 11, not yet run), four H100s (nvidia-h100-x4). Every #6 run so far
# spent its 8.5 minutes in full-fp32 matmuls and in evaluation:
# - the Shapes MMDiT's forward at the trainers' batch sizes is ~0.3 TFLOP; rollouts, updates and evaluation are
#   fp32 matmuls, which run.matmul_precision=high (TF32) moves to the tensor cores;
# - evaluation with validation (512 + 2858 prompts every 20 epochs) took 20-33 % of a run
#   (docs/bench/trainers_session11.md: GRPO 112 s of 515, DRaFT 167 s of 498), in batches of 512. The 512 held-out
#   prompts stay one batch at eval.batch_size=2048, so their noise is unchanged; validation draws its noise in other
#   chunks.
# One run alone per card, shipped configs + keep_best.yaml with both changes, for MINUTES (default 8.5, as the runs it
# is compared with; benchmarks/matmul_precision.py runs in gpu_session12_c.sh, on a card its benchmark leaves idle):
#   GPU 0: GRPO-Fast, --critic stitchvm       GPU 1: DDPO-Fast, --critic stitchvm
#   GPU 2: DRaFT-1, --critic stitchvm         GPU 3: GRPO-Fast twin (--critic terminal, sparse)
# Compare time/* per epoch and the finals with docs/bench/s10d_*_w8.jsonl.gz and s11b_grpo_fast_terminal_w8.jsonl.gz
# (the same runs at highest / 512 on H100s).
#   bash benchmarks/gpu_session12_a.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000 eval.batch_size=2048 run.matmul_precision=high"
train 0 grpo stitchvm grpo_fast_tf32 $K
train 1 ddpo stitchvm ddpo_fast_tf32 $K
train 2 draft stitchvm draft_tf32 $K
train 3 grpo terminal grpo_fast_terminal_tf32 $K algo.advantages=sparse
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
SESSION=12 finish grpo_fast_tf32 ddpo_fast_tf32 draft_tf32 grpo_fast_terminal_tf32
(cd $OUT && tar -cf logs.tar log && rm -rf log)  # the device tool returns at most 8 files
ls $OUT
