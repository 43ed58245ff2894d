#!/usr/bin/env bash
# Session-7 GPU call for issue #6: GRPO-Fast as in gpu_session7_a.sh (CLIP reward, group noise, dense lambda 0, keep_best
# on ~600 validation prompts, EMA 0.98) with the prompt-conditioned noise-level experts as the critic
# (--critic stitchvm_experts: rho .61 / .27 at sigma .75 / .9 on test prompts, against .46 / .08 for --critic stitchvm;
# the Fast window's steps sit at sigma ~0.7-1), alone on one GPU.
#   bash benchmarks/gpu_session7_b.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml prompts.val.n=${VAL_N:-1000} run.ckpt_every=100000"
n=grpo_fast_experts_ema98
train 0 grpo stitchvm_experts $n $K algo.ema_decay=0.98
wait
grep -a "eval/overall\|val/overall" $OUT/log/$n.txt | grep -o "eval/overall=[0-9.]*\|val/overall=[0-9.]*" | tr '\n' ' '; echo
grep -a "^final\|rror" $OUT/log/$n.txt | tail -4
cp $OUT/runs/$n/metrics.jsonl $OUT/s7_$n.jsonl; rm -rf $OUT/runs  # only the metrics come back (transfer limit)
