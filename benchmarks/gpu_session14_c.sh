#!/usr/bin/env bash
# GPU call for issue #4 and the steering figures (session 14), two GPUs (nvidia-h100-x2 / nvidia-h200-x2; the
# four-GPU kinds were not lent when it ran).
# #4: stage 3 regresses V(z_t) onto the realised reward of the policy's SDE trajectories, with CFG drawn from
# onpolicy.guidance_scales [1, 4.5] and 10-25 steps: half of its targets are CFG-free futures (the RL rollouts'),
# while the value benchmark's truth V_MC (and steering, evaluation) follow the policy's defaults, CFG 4.5 and 20 steps.
# A value that averages two futures ranks neither exactly; session 13's mid-band stage 3 (CFG 1 and 4.5) reached
# .800 / .793 at sigma 0.5. Here the same stage 3 with the benchmark's own sampler settings:
#   GPU 0: from the low-sigma expert, sigma ~ U(0.3, 0.7), CFG 4.5, 20 steps (session 13's low_mid otherwise)
#   GPU 1: benchmarks/steering_gpu.py at 1024^2, the text side now cached for every method (session 13's review):
#          the README's V(z) and DPS ratios are upper bounds until this runs
# then critics.bench_value on 512 validation (seed 1) and 512 test (seed 0) prompts, K = 8 (cards 0 and 1).
#   bash benchmarks/gpu_session14_c.sh OUT
set -u
OUT=${1:?out}; BUILD_S=${BUILD_S:-230}; WORKERS=12; LOG_EVERY=250; source benchmarks/critic_call_lib.sh
S3="onpolicy.enabled=true onpolicy.steps=600 onpolicy.guidance_scales=[4.5] onpolicy.num_steps=[20]"
CUDA_VISIBLE_DEVICES=1 OUT=$OUT timeout ${STEER_S:-420} python benchmarks/steering_gpu.py --resolutions 1024 \
  --budget-s ${STEER_BUDGET:-300} > $OUT/steering_gpu.md 2> $OUT/log/steering_gpu.err &
crit 0 low_mid_cfg $S3 init_from=shapes/weights/stitchvm_prompt_low 'onpolicy.sigma_range=[0.3,0.7]' &
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
grep -h "build:save\|step 600\|rror" $OUT/log/*.txt
NAMES="low_mid_cfg"
bench $NAMES
wait
bench_report
echo "== steering"; cat $OUT/steering_gpu.md; tail -3 $OUT/log/steering_gpu.err
pack $NAMES
