#!/usr/bin/env bash
# Next GPU call for issue #6 (written in session 14, not yet run), four GPUs (nvidia-h100-x4; an H200 host fits ~17 %
# more epochs: docs/bench/trainers_session14.md replays keep_best at the H100's epoch count). Session 14 found the
# decode-and-score twins (sparse) train better than the critic runs (validation plateau .60-.61 against .52-.57):
# the shipped dense estimator (gae_lambda 0) lets one critic value at sigma 0.71-0.96, where the critic ranks a group's
# samples at rho <= 0.21, split each reward between the window's two steps. With gae_lambda 1, group noise and
# dense_norm group_step the first step's credit is exactly the sparse one and the second's is R - V(z_k+1) centred,
# a state baseline; dense_calibration batch scales V by the batch's slope of R on V, so an uninformative critic leaves
# the sparse signal as it is. Shipped beta 0.04.
#   GPU 0: GRPO-Fast, lambda 1, calibrated, group_step, seed 0      GPU 1: the same, seed 1
#   GPU 2: DDPO-Fast, lambda 1, calibrated, group_step, seed 0
#   GPU 3: GRPO-Fast, lambda 1, calibrated, group_step, the window moved to sigma <= 0.71 (start U{4..6}), where the
#          critic ranks a group's samples at rho >= 0.6 (benchmarks/window_credit.py)
# Against: the twins' validation plateau (.58-.61) and finals (GRPO mean .527, DDPO ~.52); compare_runs.py.
#   bash benchmarks/gpu_session15_a.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000 algo.gae_lambda=1.0 algo.dense_calibration=batch algo.dense_norm=group_step"
# Four-GPU kinds were not lent at the start of session 15, so on two GPUs: PAIR=1 runs GRPO and DDPO seed 0 (GPUs 0 and
# 2 above), PAIR=2 GRPO seed 1 and the moved window (GPUs 1 and 3), PAIR=2b GRPO and DDPO seed 1 (what session 15 ran).
# Since session 15 the three estimator overrides in K are the configs' defaults (kept: the record of what ran).
case ${PAIR:-all} in
  all) train 0 grpo stitchvm grpo_fast_l1cal $K; train 1 grpo stitchvm grpo_fast_l1cal_s1 $K run.seed=1
       train 2 ddpo stitchvm ddpo_fast_l1cal $K; train 3 grpo stitchvm grpo_fast_l1cal_w46 $K 'algo.sde_window_start=[4,6]'
       NAMES="grpo_fast_l1cal grpo_fast_l1cal_s1 ddpo_fast_l1cal grpo_fast_l1cal_w46";;
  1) train 0 grpo stitchvm grpo_fast_l1cal $K; train 1 ddpo stitchvm ddpo_fast_l1cal $K
     NAMES="grpo_fast_l1cal ddpo_fast_l1cal";;
  2) train 0 grpo stitchvm grpo_fast_l1cal_s1 $K run.seed=1; train 1 grpo stitchvm grpo_fast_l1cal_w46 $K 'algo.sde_window_start=[4,6]'
     NAMES="grpo_fast_l1cal_s1 grpo_fast_l1cal_w46";;
  2b) train 0 grpo stitchvm grpo_fast_l1cal_s1 $K run.seed=1; train 1 ddpo stitchvm ddpo_fast_l1cal_s1 $K run.seed=1
     NAMES="grpo_fast_l1cal_s1 ddpo_fast_l1cal_s1";;
  *) echo "error: PAIR must be all, 1, 2 or 2b, got '$PAIR'" >&2; exit 2;;
esac
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
SESSION=15 finish $NAMES
(cd $OUT && tar -cf logs.tar log && rm -rf log)  # the device tool returns at most 8 files
ls $OUT
