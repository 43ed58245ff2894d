#!/usr/bin/env bash
# Session-4 GPU call A (4 GPUs of one host):
#   GPUs 0-1  ZeRO-3 with per-block parameter fetching (rl.distributed.zero3_leaf_blocks): 1 vs 2 GPUs at 8192 rows
#             per epoch (benchmarks/multi_gpu.py), then two short GRPO/DDPO screens per GPU
#   GPU 2     the CUDA-graph steering tests, then benchmarks/steering_gpu.py (default attention, with the kernel
#             profile) and again at 1024^2 with cuDNN attention first
#   GPU 3     GRPO and DDPO screens of a larger step (lr, clip range) on the checker critic, whole budget
#   bash benchmarks/gpu_session4_a.sh OUT
set -u
OUT=${1:?out}; source benchmarks/session3_lib.sh
DENSE="algo.advantages=dense algo.gae_lambda=1.0"
M=8
train 3 grpo stitchvm_checker grpo_chk_lr1e-3_clip1e-3 $DENSE algo.lr=1e-3 algo.clip_range=1e-3
train 3 ddpo stitchvm_checker ddpo_chk_lr1e-3_clip1e-3 $DENSE algo.lr=1e-3 algo.clip_range=1e-3
(
  export CUDA_VISIBLE_DEVICES=2
  python -m pytest -q -m gpu -rs tests/rl/steering/test_graphs.py > $OUT/log/gpu_tests.txt 2>&1
  python benchmarks/steering_gpu.py --profile --budget-s 300 --json $OUT/steering_default.json \
    > $OUT/steering_default.md 2> $OUT/log/steering_default.err
  python benchmarks/steering_gpu.py --sdpa cudnn --resolutions 1024 --budget-s 140 --json $OUT/steering_cudnn.json \
    > $OUT/steering_cudnn.md 2> $OUT/log/steering_cudnn.err
) &
export CUDA_VISIBLE_DEVICES=0,1
python -m benchmarks.multi_gpu --out $OUT/mg8192 --backends zero3 --prompts 1024 --rollout-batch 8192 \
  --train-batch 4096 --epochs 4 --timeout 150 --budget 250 > $OUT/log/mg8192.txt 2>&1
unset CUDA_VISIBLE_DEVICES
M=${SCREEN_MIN:-3.5}
train 0 grpo stitchvm_checker grpo_chk_lr3e-4_clip1e-3 $DENSE algo.clip_range=1e-3
train 0 grpo stitchvm_checker grpo_chk_lr1e-3_clip1e-2_kl0.01 $DENSE algo.lr=1e-3 algo.clip_range=1e-2 algo.kl_beta=0.01
train 1 ddpo stitchvm_checker ddpo_chk_lr3e-4_clip1e-3 $DENSE algo.clip_range=1e-3
train 1 ddpo stitchvm_checker ddpo_chk_lr1e-3_clip1e-2 $DENSE algo.lr=1e-3 algo.clip_range=1e-2
wait
report
