#!/usr/bin/env bash
# Session-7 GPU call for issue #6 (two GPUs, one run alone on each, 9 minutes, keep_best + EMA with the optimizer-
# step clock of session 6's review, validation on ~600 test-split prompts disjoint from the evaluation ones):
#   GPU 0  GRPO-Fast, CLIP reward, --critic stitchvm (the shipped config)
#   GPU 1  DDPO, the ShapesEval checker as the reward (configs/experiments/shapes_checker.yaml) with its StitchVM
#          (--critic stitchvm_checker, regressed onto the checker), group noise, dense lambda 0, KL 0.04
#   bash benchmarks/gpu_session7_a.sh OUT
# (the session-7 call ran it without the last two lines, so its records did not come back: docs/bench/trainers_session7_h100x2.md)
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-9}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml prompts.val.n=${VAL_N:-1000} run.ckpt_every=100000"
train 0 grpo stitchvm grpo_fast_ema98 $K algo.ema_decay=0.98
train 1 ddpo stitchvm_checker ddpo_chk_ema99 $K algo.ema_decay=0.99
wait
SESSION=7 finish grpo_fast_ema98 ddpo_chk_ema99
