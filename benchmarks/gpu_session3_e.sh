#!/usr/bin/env bash
# Session-3 GPU call E (one GPU): the CPU main job's settings, second sweep (seeds), as gpu_session3_d.sh part 1.
set -u
OUT=${1:?out}; mkdir -p $OUT/runs $OUT/log
E=${EPOCHS:-50}
cpu() {  # name overrides...
  local n=$1; shift
  OMP_NUM_THREADS=2 python rl/train.py --algo nft --critic stitchvm run.output_dir=$OUT/runs/$n run.max_epochs=$E \
    run.eval_every=25 run.ckpt_every=1000 run.export_lora=false prompts.eval.n=512 eval.batch_size=512 "$@" \
    > $OUT/log/$n.txt 2>&1 &
}
P="algo.prompts_per_epoch=16 algo.group_size=4"
for s in 0 1 2; do cpu p16g4_lr3e-4_s$s $P algo.lr=3e-4 run.seed=$s; done
for s in 1 2; do cpu p16g4_lr1e-4_s$s $P run.seed=$s; done
cpu p16g4_lr2e-4_s0 $P algo.lr=2e-4
cpu default_s1 run.seed=1
cpu p16g4_lr3e-4_tf0.9_s0 $P algo.lr=3e-4 algo.timestep_fraction=0.9
wait
for f in $OUT/log/*.txt; do echo "== $f"; grep -a "eval/overall" $f | sed 's/.*eval\/overall=/overall=/' | tr '\n' ' '; echo; done
