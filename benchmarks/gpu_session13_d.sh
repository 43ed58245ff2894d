#!/usr/bin/env bash
# GPU call for issue #6 (session 13), four H100s (nvidia-h100-x4): two more seeds of call B's beta 0.01 for GRPO-Fast
# and DDPO-Fast, on the ~5 device-minutes the session had left, so on a shorter budget (MINUTES 4.2). Call B
# (benchmarks/gpu_session13_b.sh) gave finals .541 (GRPO) and .551 (DDPO) at beta 0.01 in 8.5 minutes, run.seed 0.
#   GPU 0: GRPO-Fast beta 0.01 seed 1     GPU 1: GRPO-Fast beta 0.01 seed 2
#   GPU 2: DDPO-Fast beta 0.01 seed 1     GPU 3: DDPO-Fast beta 0.01 seed 2
#   MINUTES=4.2 bash benchmarks/gpu_session13_d.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-4.2}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000 algo.kl_beta=0.01"
train 0 grpo stitchvm grpo_fast_kl0.01_s1 $K run.seed=1
train 1 grpo stitchvm grpo_fast_kl0.01_s2 $K run.seed=2
train 2 ddpo stitchvm ddpo_fast_kl0.01_s1 $K run.seed=1
train 3 ddpo stitchvm ddpo_fast_kl0.01_s2 $K run.seed=2
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
SESSION=${SESSION:-13} finish grpo_fast_kl0.01_s1 grpo_fast_kl0.01_s2 ddpo_fast_kl0.01_s1 ddpo_fast_kl0.01_s2
(cd $OUT && tar -cf logs.tar log && rm -rf log)  # the device tool returns at most 8 files
ls $OUT
