#!/usr/bin/env bash
# Session-3 GPU call C (4 GPUs of one host): the trainers on the ShapesEval checker reward
# (configs/experiments/shapes_checker.yaml) with its StitchVM (stitchvm_checker) against decode-and-score, and the
# whole-GPU-share figures of NFT and DRaFT on the CLIP reward. Pairs share a GPU (equal contention).
set -u
OUT=${1:?out}; source benchmarks/session3_lib.sh
train 0 grpo stitchvm_checker grpo_chk_stitchvm algo.advantages=dense algo.gae_lambda=1.0
train 0 grpo terminal grpo_chk_terminal algo.advantages=sparse
train 1 ddpo stitchvm_checker ddpo_chk_stitchvm algo.advantages=dense algo.gae_lambda=1.0
train 1 ddpo terminal ddpo_chk_terminal algo.advantages=sparse
train 2 nft stitchvm_checker nft_chk_stitchvm
train 2 nft terminal nft_chk_terminal
train 3 nft stitchvm nft_clip_stitchvm
train 3 draft stitchvm draft_clip_stitchvm algo.ema_decay=0.99
wait
report
