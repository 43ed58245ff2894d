#!/usr/bin/env bash
# GPU call for issue #4 (written in session 12, run in session 13: docs/critic.md, "Session 13"), four H100s
# (nvidia-h100-x4), one build per card, then the value benchmark on 512 validation (seed 1) and 512 test (seed 0)
# prompts at sigma 0.1 / 0.25 / 0.5 / 0.75 / 0.9.
# Session 12 (docs/critic.md) found stage 3 gains in the band it is run on and loses a little outside it: the uniform
# expert's stage 3 on sigma [0.5, 1] is shipped; the low expert's on [0, 0.5] trades sigma <= 0.25 for sigma 0.5. The
# target left within reach is rho >= 0.8 at sigma 0.5 on test prompts (best .787). So: stage 3 on bands centred there,
# and a second round of the shipped uniform expert's.
#   GPU 0: stage 3 from the low-sigma expert, sigma ~ U(0.3, 0.7), 600 steps (a mid-band expert)
#   GPU 1: stage 3 from the low-sigma expert, sigma ~ U(0.4, 0.6), 600 steps (narrower)
#   GPU 2: stage 3 from the shipped uniform expert (already one round), sigma ~ U(0.3, 0.7), 600 steps
#   GPU 3: a second round from the shipped uniform expert, sigma ~ U(0.5, 1.0), 600 steps
# A third expert for a mid band would add 5.5 MB to the tree: check the upload (49 MB + 12 MB of wheels) before
# shipping one; replacing an expert costs nothing. Each build comes back as one tar (NAME.tar); logs, tables, JSON
# as results.tar.
#   bash benchmarks/gpu_session13_c.sh OUT
set -u
OUT=${1:?out}; BUILD_S=${BUILD_S:-340}; WORKERS=12; LOG_EVERY=250; source benchmarks/critic_call_lib.sh
S3="onpolicy.enabled=true onpolicy.steps=600"
crit 0 low_mid $S3 init_from=shapes/weights/stitchvm_prompt_low 'onpolicy.sigma_range=[0.3,0.7]' &
crit 1 low_narrow $S3 init_from=shapes/weights/stitchvm_prompt_low 'onpolicy.sigma_range=[0.4,0.6]' &
crit 2 unif_mid $S3 init_from=shapes/weights/stitchvm_prompt 'onpolicy.sigma_range=[0.3,0.7]' &
crit 3 unif_round2 $S3 init_from=shapes/weights/stitchvm_prompt 'onpolicy.sigma_range=[0.5,1.0]' &
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
grep -h "policy samples\|build:save\|step 600\|rror" $OUT/log/*.txt
NAMES="low_mid low_narrow unif_mid unif_round2"
bench $NAMES
wait
bench_report
pack $NAMES
