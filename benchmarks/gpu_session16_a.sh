#!/usr/bin/env bash
# Next GPU call for issue #6 (written in session 15, not yet run): more seeds of the shipped dense estimator.
# Session 15 (docs/bench/trainers_session15.md) shipped gae_lambda 1, dense_norm group_step, dense_calibration batch
# (the configs' defaults now, so no override here): finals at the H100's epochs GRPO .537 / .510, DDPO .559 / .521
# (seeds 0 / 1), against +0.15 = 0.527; the seed spread (+-0.02-0.03) decides. Two more seeds of each give four per
# trainer, as session 14 ran for beta 0.01. One run alone per card, shipped configs + keep_best.yaml, MINUTES (8.5).
#   PAIR=all (four GPUs): GPU 0/1 GRPO-Fast seeds 2/3, GPU 2/3 DDPO-Fast seeds 2/3
#   PAIR=1 / PAIR=2 (two GPUs): GRPO seeds 2 and 3 / DDPO seeds 2 and 3
#   PAIR=w (two GPUs): GRPO-Fast seed 0 with the window at sigma <= 0.71 (start U{4..6}), and DDPO-Fast likewise
#   PAIR=w4 (four GPUs, session 16's third call): GRPO-Fast seed 0 with the window at U{4..6}: --critic stitchvm, its
#          sparse twin (--critic terminal algo.advantages=sparse), and --critic stitchvm_experts; and the experts at the
#          shipped window (against session 15's seed-0 stitchvm run, s15a_grpo_fast_*)
#   PAIR=x (two GPUs): GRPO-Fast with --critic stitchvm_experts, shipped window and at U{4..6}. With the shipped
#          estimator the experts raise the second window step's credit above the sparse one at k = 3-4 (.74 -> .82,
#          .63 -> .76; benchmarks/window_credit.py, docs/bench/window_credit_cpu.md), where stitchvm adds nothing
# Replay an H200 run at the H100's epochs: benchmarks/compare_runs.py RUN --clock RUN=docs/bench/s13b_grpo_fast_kl0.01.jsonl.gz
#   PAIR=1 bash benchmarks/gpu_session16_a.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000"
W="algo.sde_window_start=[4,6]"
case ${PAIR:-all} in
  all) train 0 grpo stitchvm grpo_fast_s2 $K run.seed=2; train 1 grpo stitchvm grpo_fast_s3 $K run.seed=3
       train 2 ddpo stitchvm ddpo_fast_s2 $K run.seed=2; train 3 ddpo stitchvm ddpo_fast_s3 $K run.seed=3
       NAMES="grpo_fast_s2 grpo_fast_s3 ddpo_fast_s2 ddpo_fast_s3";;
  1) train 0 grpo stitchvm grpo_fast_s2 $K run.seed=2; train 1 grpo stitchvm grpo_fast_s3 $K run.seed=3
     NAMES="grpo_fast_s2 grpo_fast_s3";;
  2) train 0 ddpo stitchvm ddpo_fast_s2 $K run.seed=2; train 1 ddpo stitchvm ddpo_fast_s3 $K run.seed=3
     NAMES="ddpo_fast_s2 ddpo_fast_s3";;
  w) train 0 grpo stitchvm grpo_fast_w46 $K "$W"; train 1 ddpo stitchvm ddpo_fast_w46 $K "$W"
     NAMES="grpo_fast_w46 ddpo_fast_w46";;
  w4) train 0 grpo stitchvm grpo_fast_w46 $K "$W"; train 1 grpo terminal grpo_fast_w46_terminal $K "$W" algo.advantages=sparse
      train 2 grpo stitchvm_experts grpo_fast_experts_w46 $K "$W"; train 3 grpo stitchvm_experts grpo_fast_experts $K
      NAMES="grpo_fast_w46 grpo_fast_w46_terminal grpo_fast_experts_w46 grpo_fast_experts";;
  x) train 0 grpo stitchvm_experts grpo_fast_experts $K; train 1 grpo stitchvm_experts grpo_fast_experts_w46 $K "$W"
     NAMES="grpo_fast_experts grpo_fast_experts_w46";;
  *) echo "error: PAIR must be all, 1, 2, w, w4 or x, got '$PAIR'" >&2; exit 2;;
esac
end_call 16 $NAMES
