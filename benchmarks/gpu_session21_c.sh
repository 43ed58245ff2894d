#!/usr/bin/env bash
# Session 21, third call (docs/critic.md, "Session 21"): the shipped low-sigma expert's recipe (teacher decoded, the
# bank's own latents, stitch_blocks 4, 75 % of a 98304-sample bank), one change per card:
#   GPU 0: the own-caption score term (distill.lambda_own_score 1), now that every target is r(D(z0))
#   GPU 1: 5000 steps instead of 4000 (the loss still falls at the end)
#   GPU 2: policy samples 90 % of every batch                   GPU 3: lr 4.5e-4 (1.5x)
# then critics.bench_value as calls A and B (each build as itself and as the denoised experts' low expert, "NAME_dn").
#   bash benchmarks/gpu_session21_c.sh OUT
set -u
OUT=${1:?out}; BUILD_S=${BUILD_S:-470}; BANK=98304; WORKERS=12; LOG_EVERY=500; source benchmarks/critic_call_lib.sh
SHIP="distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6 distill.teacher_input=decoded
      policy_samples.student_latents=own stitch_blocks=4 policy_samples.fraction=0.75"
crit 0 own1 $SHIP distill.lambda_own_score=1 &
crit 1 steps5k $SHIP distill.max_steps=5000 &
crit 2 f90 $SHIP policy_samples.fraction=0.9 &
crit 3 lr45 $SHIP distill.lr=4.5e-4 &
NAMES="own1 steps5k f90 lr45"
DENOISED=1 BENCH_S=${BENCH_S:-240} end_builds $NAMES
