#!/usr/bin/env bash
# GPU call for issue #6 (session 13), four H100s (nvidia-h100-x4): a weaker KL anchor for GRPO-Fast and DDPO-Fast.
# Call A (benchmarks/gpu_session13_a.sh) found the held-out score falls as beta rises: GRPO finals .453 / .498 /
# .516 and DDPO .469 / .482 / .500 at beta 0.2 / 0.1 / 0.04 (the shipped value; docs/bench/s12d_*), and at beta 0.1
# GRPO reaches at epoch 280 what beta 0.04 reached at epoch 200. So the anchor binds, and this call tries beta 0.01
# (Flow-GRPO's PickScore setting) and 0 (no reference forward at all, so more epochs in the budget). One run alone
# per card, shipped configs + keep_best.yaml, MINUTES (8.5):
#   GPU 0: GRPO-Fast kl_beta 0.01     GPU 1: GRPO-Fast kl_beta 0
#   GPU 2: DDPO-Fast kl_beta 0.01     GPU 3: DDPO-Fast kl_beta 0
#   bash benchmarks/gpu_session13_b.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000"
train 0 grpo stitchvm grpo_fast_kl0.01 $K algo.kl_beta=0.01
train 1 grpo stitchvm grpo_fast_kl0 $K algo.kl_beta=0
train 2 ddpo stitchvm ddpo_fast_kl0.01 $K algo.kl_beta=0.01
train 3 ddpo stitchvm ddpo_fast_kl0 $K algo.kl_beta=0
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
SESSION=13 finish grpo_fast_kl0.01 grpo_fast_kl0 ddpo_fast_kl0.01 ddpo_fast_kl0
(cd $OUT && tar -cf logs.tar log && rm -rf log)  # the device tool returns at most 8 files
ls $OUT
