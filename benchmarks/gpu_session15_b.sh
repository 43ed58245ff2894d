#!/usr/bin/env bash
# Next GPU call for issue #4 (written in session 14, not yet run), four GPUs (nvidia-h100-x4), one build per card,
# then the value benchmark on 512 validation (seed 1) and 512 test (seed 0) prompts.
# Session 14 (docs/critic.md) found the student's ceiling is its fidelity as a whole: at sigma 0.1 it ranks the
# policy's samples at rho ~.93 against the teacher on the very images, and neither a larger stage-2 budget (session 12)
# nor a wider per-token G_psi (session 2) moved it. So: capacity that mixes tokens, `stitch_blocks` transformer blocks
# after the stitch (identity at initialisation), on the shipped low-sigma expert's recipe (docs/critic.md, session 7:
# prompt head, (7, 1), logit-normal(-2.2, 0.6), a 32768-sample bank), built from scratch:
#   GPU 0: stitch_blocks 0 (the shipped recipe, rebuilt on the same machine: the control)
#   GPU 1: stitch_blocks 2          GPU 2: stitch_blocks 4
#   GPU 3: stitch_blocks 2 with distill.stitch_lr_mult 1 (the blocks at the tail's lr, not 5x)
#   bash benchmarks/gpu_session15_b.sh OUT
set -u
OUT=${1:?out}; BUILD_S=${BUILD_S:-380}; BANK=32768; WORKERS=12; LOG_EVERY=500; source benchmarks/critic_call_lib.sh
LOW="distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6"
# On two GPUs (four-GPU kinds not lent), PAIR=1 builds the control and stitch_blocks 2 only.
case ${PAIR:-all} in
  all) crit 0 low_b0 $LOW & crit 1 low_b2 $LOW stitch_blocks=2 & crit 2 low_b4 $LOW stitch_blocks=4 &
       crit 3 low_b2_lr1 $LOW stitch_blocks=2 distill.stitch_lr_mult=1 &
       NAMES="low_b0 low_b2 low_b4 low_b2_lr1";;
  1) crit 0 low_b0 $LOW & crit 1 low_b2 $LOW stitch_blocks=2 &
     NAMES="low_b0 low_b2";;
  *) echo "error: PAIR must be all or 1, got '$PAIR'" >&2; exit 2;;
esac
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
grep -h "policy samples\|build:save\|step 4000\|rror" $OUT/log/*.txt
bench $NAMES
wait
bench_report
pack $NAMES
