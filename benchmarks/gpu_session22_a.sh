#!/usr/bin/env bash
# Session 22, first of two calls on one warm machine (docs/critic.md, "Session 22"): the shipped low-sigma expert's
# recipe (teacher decoded, the bank's own latents, stitch_blocks 4, 75 % of a 98304-sample bank), one change per card:
#   GPU 0: 10000 stage-2 steps (two calls: stopped here at BUILD_S, resumed by gpu_session22_b.sh)
#   GPU 1: 10000 steps and 6 stitch blocks (likewise)
#   GPU 2: 5000 steps, the tail at a third of the lr (1e-4; the stitch and its blocks at 1.5e-3 as shipped)
#   GPU 3: 5000 steps, the head's interface at DiT block 4 instead of 7
# The builds write their checkpoints (with the training state, every 250 steps) to $KEEP in the repository, an ignored
# folder that stays on a warm device machine between calls. What each build holds now comes back without its state.
#   bash benchmarks/gpu_session22_a.sh OUT            (four cards)
set -u
OUT=${1:?out}; BUILD_S=${BUILD_S:-530}; BANK=98304; WORKERS=12; LOG_EVERY=500; source benchmarks/critic_call_lib.sh
KEEP=${KEEP:-runs/s22}; mkdir -p $KEEP
source benchmarks/gpu_session22_builds.sh
L10k 0 & L10k6 1 & tail_lr 2 & head4 3 &
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
grep -h "policy samples\|build:save\|step [0-9]*000\|rror" "$OUT"/log/*.txt
for n in $NAMES; do stateless $KEEP/$n $OUT/$n; done
pack $NAMES
