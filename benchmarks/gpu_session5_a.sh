#!/usr/bin/env bash
# Session-5 GPU call A (4 x H100, two runs per GPU): GRPO / DDPO with large epochs. The Shapes DiT is launch-bound on
# an H100, so 1024 samples per epoch cost little more wall-clock than 256: each optimizer step sees a 4x larger,
# lower-variance batch. DDPO gets Flow-GRPO's KL anchor (algo.kl_beta), which kept GRPO near the start in session 4.
# CLIP reward (the default), held-out ShapesEval on 512 test prompts every 10 epochs, start 0.377.
#   bash benchmarks/gpu_session5_a.sh OUT
# Every setting that the shipped configs changed after this call is pinned here, so the script reruns the same runs.
set -u
OUT=${1:?out}; source benchmarks/session3_lib.sh
M=${MINUTES:-8}
BIG="algo.prompts_per_epoch=64 algo.group_size=16 algo.rollout_batch_size=1024 algo.train_batch_size=512 algo.value_batch_size=1024 algo.group_noise=false algo.sde_window=0 algo.timestep_fraction=0.6"
DBIG="algo.prompts_per_epoch=128 algo.group_size=8 algo.rollout_batch_size=1024 algo.train_batch_size=512 algo.value_batch_size=1024 algo.group_noise=false"
DENSE="algo.advantages=dense algo.gae_lambda=1.0"
train 0 grpo stitchvm grpo_big_dense_lr3e-4 $BIG $DENSE
train 0 grpo terminal grpo_big_sparse_lr3e-4 $BIG algo.advantages=sparse
train 1 grpo stitchvm grpo_big_dense_lr1e-3 $BIG $DENSE algo.lr=1e-3
train 1 grpo stitchvm grpo_big_dense0_lr3e-4 $BIG algo.advantages=dense algo.gae_lambda=0.0
train 2 ddpo stitchvm ddpo_big_dense_kl_lr3e-4 $DBIG $DENSE algo.kl_beta=0.04
train 2 ddpo terminal ddpo_big_sparse_kl_lr3e-4 $DBIG algo.advantages=sparse algo.kl_beta=0.04
train 3 ddpo stitchvm ddpo_big_dense_kl_lr1e-3 $DBIG $DENSE algo.kl_beta=0.04 algo.lr=1e-3
(sleep 5; CUDA_VISIBLE_DEVICES=3 python -m pytest -q -m gpu tests/rl/steering/test_graphs.py > $OUT/log/gpu_graph_tests.txt 2>&1) &
wait
report
grep -a -h "passed\|failed\|error" $OUT/log/gpu_graph_tests.txt | tail -3
