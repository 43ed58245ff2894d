#!/usr/bin/env bash
# Next GPU call for issue #4 (written in session 15, not yet run). Session 15 (docs/critic.md) found two transformer
# blocks after the stitch (stitch_blocks 2) lift the low-sigma expert by 0.02-0.03 at sigma <= 0.25 and 0.015 at 0.5,
# against a control rebuilt on the same machine; it is shipped. Next, on the same recipe unless said:
#   GPU 0: stitch_blocks 4                        GPU 1: stitch_blocks 2, the blocks at the tail's lr (stitch_lr_mult 1)
#   GPU 2: stage 3 on sigma ~ U(0.3, 0.7) from the shipped (stitch_blocks 2) low expert: session 13's mid-band stage 3
#          lifted the old expert to .800 / .793 at sigma 0.5
#   GPU 3: the uniform expert's recipe (sigma ~ U[0, 1]) with stitch_blocks 2 (serves sigma > 0.5)
# then critics.bench_value on 512 validation (seed 1) and 512 test (seed 0) prompts, K = 8.
#   PAIR=all (four GPUs), PAIR=1 (GPUs 0, 1), PAIR=2 (GPUs 2, 3 run as 0, 1)
#   PAIR=1 bash benchmarks/gpu_session16_b.sh OUT
set -u
OUT=${1:?out}; BUILD_S=${BUILD_S:-330}; BANK=32768; WORKERS=12; LOG_EVERY=500; source benchmarks/critic_call_lib.sh
LOW="distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6"
S3="init_from=shapes/weights/stitchvm_prompt_low stitch_blocks=2 onpolicy.enabled=true onpolicy.steps=600"
b4() { crit $1 low_b4 $LOW stitch_blocks=4; }
b2lr1() { crit $1 low_b2_lr1 $LOW stitch_blocks=2 distill.stitch_lr_mult=1; }
mid() { crit $1 low_b2_mid $S3 'onpolicy.sigma_range=[0.3,0.7]'; }
unif() { crit $1 unif_b2 distill.sigma_sampling=uniform stitch_blocks=2; }
case ${PAIR:-all} in
  all) b4 0 & b2lr1 1 & mid 2 & unif 3 & NAMES="low_b4 low_b2_lr1 low_b2_mid unif_b2";;
  1) b4 0 & b2lr1 1 & NAMES="low_b4 low_b2_lr1";;
  2) mid 0 & unif 1 & NAMES="low_b2_mid unif_b2";;
  *) echo "error: PAIR must be all, 1 or 2, got '$PAIR'" >&2; exit 2;;
esac
end_builds $NAMES
