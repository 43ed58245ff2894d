#!/usr/bin/env bash
# Session-10 GPU call for issue #6 on four H100s (nvidia-h100-x4), one run alone per card, the shipped experiment
# configs + keep_best.yaml (2858 validation prompts of the evaluation's kind mix, every 20 epochs), with the ShapesEval
# checker in 8 worker processes (eval_metric.workers, now in the shipped configs; before, evaluation took a third of
# each run). 8.2 minutes of training: what this session's device time had left.
#   GPU 0: GRPO-Fast, --critic stitchvm         GPU 1: DDPO-Fast, --critic stitchvm (lr 1.5e-4, now shipped)
#   GPU 2: DRaFT-1, --critic stitchvm (EMA 0.99, now shipped)   GPU 3: GPU 1's twin, --critic terminal algo.advantages=sparse
#   bash benchmarks/gpu_session10_d.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.2}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000"
train 0 grpo stitchvm grpo_fast_w8 $K
train 1 ddpo stitchvm ddpo_fast_w8 $K
train 2 draft stitchvm draft_w8 $K
train 3 ddpo terminal ddpo_fast_terminal_w8 $K algo.advantages=sparse
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
SESSION=10 finish grpo_fast_w8 ddpo_fast_w8 draft_w8 ddpo_fast_terminal_w8
