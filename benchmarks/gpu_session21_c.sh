#!/usr/bin/env bash
# Session 21, third call (docs/critic.md, "Session 21"): the shipped low-sigma expert's recipe (teacher decoded, the
# bank's own latents, stitch_blocks 4, 75 % of a 98304-sample bank), one change per card:
#   GPU 0: the own-caption score term (distill.lambda_own_score 1), now that every target is r(D(z0))
#   GPU 1: 5000 steps instead of 4000 (the loss still falls at the end)
#   GPU 2: policy samples 90 % of every batch                   GPU 3: lr 4.5e-4 (1.5x)
# then critics.bench_value as calls A and B (each build as itself and as the denoised experts' low expert, "NAME_dn").
#   bash benchmarks/gpu_session21_c.sh OUT            (four cards)
#   PAIR=under bash benchmarks/gpu_session21_c.sh OUT (two cards: GPUs 1 and 3's builds; run in session 21)
set -u
OUT=${1:?out}; BUILD_S=${BUILD_S:-470}; BANK=98304; WORKERS=12; LOG_EVERY=500; source benchmarks/critic_call_lib.sh
SHIP="distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6 distill.teacher_input=decoded
      policy_samples.student_latents=own stitch_blocks=4 policy_samples.fraction=0.75"
own1() { crit $1 own1 $SHIP distill.lambda_own_score=1; }
steps5k() { crit $1 steps5k $SHIP distill.max_steps=5000; }
f90() { crit $1 f90 $SHIP policy_samples.fraction=0.9; }
lr45() { crit $1 lr45 $SHIP distill.lr=4.5e-4; }
case ${PAIR:-all} in  # PAIR=under (two cards): the longer schedule and the larger lr, on cards 0 and 1
  all) own1 0 & steps5k 1 & f90 2 & lr45 3 & NAMES="own1 steps5k f90 lr45";;
  under) steps5k 0 & lr45 1 & NAMES="steps5k lr45";;
  *) echo "error: PAIR must be all or under, got '$PAIR'" >&2; exit 2;;
esac
DENOISED=1 DENOISED_SPEC='denoised[sigma_in=0.15,noise_draws=1]' BENCH_S=${BENCH_S:-240} end_builds $NAMES  # the settings shipped then
