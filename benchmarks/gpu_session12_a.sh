#!/usr/bin/env bash
# Next GPU call for issue #6 (written in session 11, not yet run), four H100s (nvidia-h100-x4), one run alone per card,
# shipped configs + keep_best.yaml, 8.5 minutes. Evaluation with validation (512 + 2858 prompts every 20 epochs) takes
# 20-33 % of a run (docs/bench/trainers_session11.md: GRPO 112 s of 515, DRaFT 167 s of 498), and the GRPO twin was
# still rising when its time ran out. This tries the evaluation in batches of 2048 instead of 512: the 512 held-out
# prompts stay one batch, so their noise and scores are unchanged; validation draws its noise in other chunks.
#   GPU 0: GRPO-Fast, --critic stitchvm       GPU 1: DDPO-Fast, --critic stitchvm
#   GPU 2: DRaFT-1, --critic stitchvm         GPU 3: GRPO-Fast twin (--critic terminal, sparse)
# Compare time/eval and the finals with docs/bench/s10d_*_w8.jsonl.gz and s11b_grpo_fast_terminal_w8.jsonl.gz.
#   bash benchmarks/gpu_session12_a.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000 eval.batch_size=2048"
train 0 grpo stitchvm grpo_fast_eb2048 $K
train 1 ddpo stitchvm ddpo_fast_eb2048 $K
train 2 draft stitchvm draft_eb2048 $K
train 3 grpo terminal grpo_fast_terminal_eb2048 $K algo.advantages=sparse
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
SESSION=12 finish grpo_fast_eb2048 ddpo_fast_eb2048 draft_eb2048 grpo_fast_terminal_eb2048
