#!/usr/bin/env bash
# Session-9 GPU call for issue #6, DDPO (two GPUs, one run alone on each, 9 minutes, keep_best, EMA 0.98, CLIP
# reward, --critic stitchvm, exact values across ODE steps, DDPO-Fast: 2 importance-sampled PPO passes over
# Flow-GRPO-Fast's 2-step SDE window, group noise, KL 0.04). Session 8's DDPO-Fast took 4 optimizer steps per epoch
# (2 minibatches x 2 passes) with a clip range of 1e-4: after the first minibatch nearly every ratio leaves
# [1 - 1e-4, 1 + 1e-4], so the second pass is mostly the KL term and the few samples that moved the wrong way. Two
# ways to make the second pass a real importance-sampled step:
#   GPU 0  one minibatch per pass (train_batch_size 1024, accumulated over 2 micro-batches), as ddpo-pytorch
#          accumulates a pass into few steps: 2 optimizer steps per epoch, GRPO-Fast's count, at GRPO's lr 3e-4
#   GPU 1  session 8's 4 steps per epoch at lr 1e-4, with a clip range of 1e-3 so the second pass keeps its samples
#   bash benchmarks/gpu_session9_b.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-9}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000 algo.ema_decay=0.98"
W="algo.sde_window=2 algo.sde_window_start=[0,4] algo.timestep_fraction=1.0 algo.prompts_per_epoch=64 algo.group_size=16"
train 0 ddpo stitchvm ddpo_fast_fullbatch $K $W algo.train_batch_size=1024 run.gradient_accumulation_steps=2 algo.lr=3e-4
train 1 ddpo stitchvm ddpo_fast_clip1e-3 $K $W algo.clip_range=1e-3 algo.lr=1e-4
wait
SESSION=9 finish ddpo_fast_fullbatch ddpo_fast_clip1e-3
