#!/usr/bin/env bash
# Session-3 GPU call C (4 GPUs of one host): the trainers on the ShapesEval checker reward
# (configs/experiments/shapes_checker.yaml) with its StitchVM (stitchvm_checker) against decode-and-score, and the
# whole-GPU-share figures of NFT and DRaFT on the CLIP reward. Pairs share a GPU (equal contention).
set -u
OUT=${1:?out}; mkdir -p $OUT/runs $OUT/log
M=${MINUTES:-8.5}
train() {  # gpu algo critic name extra...
  local g=$1 a=$2 c=$3 n=$4; shift 4
  local exp=configs/experiments/shapes_gpu_$a.yaml; [ $a = nft ] && exp=configs/experiments/shapes_gpu.yaml
  local chk=""; case $n in *_chk_*) chk="--config configs/experiments/shapes_checker.yaml";; esac
  CUDA_VISIBLE_DEVICES=$g OMP_NUM_THREADS=4 python rl/train.py --algo $a --critic $c --config $exp $chk \
    run.output_dir=$OUT/runs/$n run.max_minutes=$M run.export_lora=false "$@" > $OUT/log/$n.txt 2>&1 &
}
train 0 grpo stitchvm_checker grpo_chk_stitchvm algo.advantages=dense algo.gae_lambda=1.0
train 0 grpo terminal grpo_chk_terminal algo.advantages=sparse
train 1 ddpo stitchvm_checker ddpo_chk_stitchvm algo.advantages=dense algo.gae_lambda=1.0
train 1 ddpo terminal ddpo_chk_terminal algo.advantages=sparse
train 2 nft stitchvm_checker nft_chk_stitchvm
train 2 nft terminal nft_chk_terminal
train 3 nft stitchvm nft_clip_stitchvm
train 3 draft stitchvm draft_clip_stitchvm algo.ema_decay=0.99
wait
for f in $OUT/log/*.txt; do echo "== $f"; tail -n 2 $f | cut -c1-300; done
