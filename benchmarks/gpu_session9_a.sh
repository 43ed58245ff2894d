#!/usr/bin/env bash
# Session-9 GPU call for issue #6, GRPO (two GPUs, one run alone on each, 9 minutes, keep_best on ~600 validation
# prompts, EMA 0.98, CLIP reward): the shipped GRPO-Fast config with exact values across ODE steps, and its
# decode-and-score twin (the same run with --critic terminal and the classic sparse group-relative reward), for the
# wall-clock at equal held-out score:
#   GPU 0  GRPO-Fast, --critic stitchvm, dense (configs/experiments/shapes_gpu_grpo.yaml as shipped)
#   GPU 1  GRPO-Fast, --critic terminal, algo.advantages=sparse
#   bash benchmarks/gpu_session9_a.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-9}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000"
train 0 grpo stitchvm grpo_fast_exact $K
train 1 grpo terminal grpo_fast_terminal $K algo.advantages=sparse
wait
SESSION=9 finish grpo_fast_exact grpo_fast_terminal
