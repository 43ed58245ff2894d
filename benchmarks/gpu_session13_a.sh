#!/usr/bin/env bash
# GPU call for issue #6 (written in session 12, run in session 13), four H100s (nvidia-h100-x4): a stronger KL anchor
# for GRPO-Fast and DDPO-Fast. Their held-out score peaks near epoch 260-280 and then sinks while the CLIP reward
# keeps rising (docs/bench/trainers_session12.md: GRPO .553 at epoch 280, .447-.516 after epoch 400), and validation
# cannot pick the peak's adapter. The KL term sits at ~0.0035 x beta 0.04 = 1.4e-4, below the policy loss; beta 0.1
# and 0.2 let the anchor act on the drift. One run alone per card, shipped configs + keep_best.yaml, MINUTES (8.5):
#   GPU 0: GRPO-Fast kl_beta 0.2     GPU 1: GRPO-Fast kl_beta 0.1
#   GPU 2: DDPO-Fast kl_beta 0.2     GPU 3: DDPO-Fast kl_beta 0.1
# Compare with docs/bench/s12d_{grpo,ddpo}_fast_graphs.jsonl.gz (beta 0.04; finals 0.516, 0.500). time/* now
# synchronises the GPU at section ends, so its split is each section's own GPU time.
# Result (session 13, docs/bench/trainers_session13.md): a stronger anchor slows learning and lowers the plateau
# (finals GRPO .453 / .498, DDPO .469 / .482 at beta 0.2 / 0.1); benchmarks/gpu_session13_b.sh goes the other way.
#   bash benchmarks/gpu_session13_a.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000"
train 0 grpo stitchvm grpo_fast_kl0.2 $K algo.kl_beta=0.2
train 1 grpo stitchvm grpo_fast_kl0.1 $K algo.kl_beta=0.1
train 2 ddpo stitchvm ddpo_fast_kl0.2 $K algo.kl_beta=0.2
train 3 ddpo stitchvm ddpo_fast_kl0.1 $K algo.kl_beta=0.1
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
SESSION=13 finish grpo_fast_kl0.2 grpo_fast_kl0.1 ddpo_fast_kl0.2 ddpo_fast_kl0.1
(cd $OUT && tar -cf logs.tar log && rm -rf log)  # the device tool returns at most 8 files
ls $OUT
