#!/usr/bin/env bash
# Next GPU call for issue #4 (written in session 11, not yet run), four H100s (nvidia-h100-x4), one build per card, then
# the value benchmark on 512 validation (seed 1) and 512 test (seed 0) prompts at sigma 0.1 / 0.25 / 0.5 / 0.75 / 0.9.
# Session 11 (docs/critic.md) found stage 3 run to the end of its schedule the one lever that moved sigma >= 0.5
# (+0.02 at 0.5, +0.08 at 0.75), but its weights did not come back (the device tool returns at most 8 files), and its
# stage-2 builds stopped at ~60 % of their schedule: a step there costs ~0.1 s whatever the card, so the GPU is idle
# most of it and a 4x larger batch should cost little more per step.
#   GPU 0: stage 3 from the low-sigma expert, sigma ~ U(0, 0.5), 600 steps (session 11's build, again, to ship)
#   GPU 1: stage 3 from the uniform expert, sigma ~ U(0.5, 1.0), 600 steps (the band it serves)
#   GPU 2: the low-sigma expert's recipe, bank of 98304 samples, batch 512 for 2000 steps (2x the samples of 4000 x 128)
#   GPU 3: the uniform expert's recipe, the same
# While the benchmark runs on cards 0 and 1, benchmarks/matmul_precision.py (for #6) times TF32 / bf16 on card 2.
# Each build comes back as one tar (NAME.tar); the logs, tables and JSON as results.tar.
#   bash benchmarks/gpu_session12_c.sh OUT
set -u
OUT=${1:?out}; BUILD_S=${BUILD_S:-340}; WORKERS=12; LOG_EVERY=250; source benchmarks/critic_call_lib.sh
LOW="distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6"
BIG="distill.batch_size=512 distill.max_steps=2000 loader_batch_size=512"
crit 0 low_stage3 init_from=shapes/weights/stitchvm_prompt_low onpolicy.enabled=true onpolicy.steps=600 \
  'onpolicy.sigma_range=[0.0,0.5]' &
crit 1 unif_stage3 init_from=shapes/weights/stitchvm_prompt onpolicy.enabled=true onpolicy.steps=600 \
  'onpolicy.sigma_range=[0.5,1.0]' &
crit 2 low_b512 $LOW $BIG &
crit 3 unif_b512 distill.sigma_sampling=uniform $BIG &
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
grep -h "policy samples\|build:save\|step 2000\|step 600\|rror" $OUT/log/*.txt
NAMES="low_stage3 unif_stage3 low_b512 unif_b512"
bench $NAMES
CUDA_VISIBLE_DEVICES=2 timeout 140 python benchmarks/matmul_precision.py > $OUT/matmul_precision.md 2>$OUT/log/mp.err &
wait
cat $OUT/matmul_precision.md; tail -2 $OUT/log/mp.err
bench_report
pack $NAMES
