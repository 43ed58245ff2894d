#!/usr/bin/env bash
# Next GPU call for issue #6 (written in session 13, not yet run), four H100s (nvidia-h100-x4): the decode-and-score
# twins at the KL weight session 13 found (beta 0.01), for the issue's "wall-clock against the same trainer with
# decode-and-score at equal final reward", and a third seed of each critic run. Run after gpu_session14_a.sh; with
# its seeds 1-2 these make three critic runs and one twin per trainer at beta 0.01 (session 13's twins ran at 0.04).
#   GPU 0: GRPO-Fast beta 0.01, --critic terminal, sparse (the classic Flow-GRPO signal)
#   GPU 1: DDPO-Fast beta 0.01, --critic terminal, sparse
#   GPU 2: GRPO-Fast beta 0.01, --critic stitchvm, seed 3     GPU 3: DDPO-Fast beta 0.01, --critic stitchvm, seed 3
# Compare with benchmarks/compare_runs.py (its "s to reach others' final" and plateau columns).
#   bash benchmarks/gpu_session14_b.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000 algo.kl_beta=0.01"
train 0 grpo terminal grpo_fast_kl0.01_terminal $K algo.advantages=sparse
train 1 ddpo terminal ddpo_fast_kl0.01_terminal $K algo.advantages=sparse
train 2 grpo stitchvm grpo_fast_kl0.01_s3 $K run.seed=3
train 3 ddpo stitchvm ddpo_fast_kl0.01_s3 $K run.seed=3
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
SESSION=14 finish grpo_fast_kl0.01_terminal ddpo_fast_kl0.01_terminal grpo_fast_kl0.01_s3 ddpo_fast_kl0.01_s3
(cd $OUT && tar -cf logs.tar log && rm -rf log)  # the device tool returns at most 8 files
ls $OUT
