#!/usr/bin/env bash
# Session 22, second call, on the machine that ran gpu_session22_a.sh (still warm, so $KEEP is still there): each build
# of call A that stopped at a checkpoint goes on from it (resume=true, the same config), on the same card; then
# critics.bench_value at sigma 0.1-0.5 (the low expert's band) on 512 validation (seed 1) and 512 test (seed 0)
# prompts, K = 8, each build as itself and as the denoised experts' low expert ("NAME_dn"): the two 5000-step builds on
# cards 3 and 2 as soon as they are done, the two 10000-step builds on cards 1 and 0.
#   bash benchmarks/gpu_session22_b.sh OUT
set -u
OUT=${1:?out}; BUILD_S=${BUILD_S:-470}; BANK=98304; WORKERS=12; LOG_EVERY=500; source benchmarks/critic_call_lib.sh
KEEP=${KEEP:-runs/s22}; source benchmarks/gpu_session22_builds.sh
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
for n in $NAMES; do
  [ -f $KEEP/$n/stitchvm.json ] || { echo "error: $KEEP/$n is not here: this is not call A's machine" >&2; exit 2; }
done
go_on() {  # NAME CARD: resume the build if its checkpoint holds a training state (a finished build holds none)
  if [ -f $KEEP/$1/distill_state.json ]; then $1 $2 resume=true; fi
}
export SIGMAS=0.1,0.25,0.5 BUILDS=$KEEP DENOISED=1 BENCH_S=${BENCH_S:-150} DENOISED_SPEC='denoised[sigma_in=0.15,noise_draws=1]'  # shipped then
( go_on tail_lr 2 & go_on head4 3 & wait; BENCH_CARDS="3 2" BENCH_TAG=_arms bench_denoised tail_lr head4; wait ) &
( go_on L10k 0 & go_on L10k6 1 & wait; BENCH_CARDS="1 0" BENCH_TAG=_long bench_denoised L10k L10k6; wait ) &
wait
grep -h "resuming\|build:save\|step [0-9]*000\|rror" "$OUT"/log/*.txt
BENCH_TAG=_arms bench_report; BENCH_TAG=_long bench_report
for n in $NAMES; do stateless $KEEP/$n $OUT/$n; done
pack $NAMES
