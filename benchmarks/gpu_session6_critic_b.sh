#!/usr/bin/env bash
# Session-6 GPU call for issue #4, diagnostic: is the StitchVM's imprecise fit at low sigma a capacity trade-off
# across noise levels or a limit of the head's features? Three stage-2 builds at once (3000 steps): a low-sigma
# specialist (sigma = sigmoid(N(-2.2, 0.6)), mostly 0.04-0.25) at (7, 4) and at (7, 1) (all six CLIP blocks
# trained), and the full DiT (8 of 8 blocks) as head at sigma ~ U[0, 1]; then rho vs V_MC at sigma 0.1 / 0.5 on
# validation prompts.
#   bash benchmarks/gpu_session6_critic_b.sh OUT
set -u
OUT=${1:?out}; mkdir -p $OUT/log
S=${STEPS:-3000}
B() { local n=$1; shift; timeout ${BUILD_S:-400} env OMP_NUM_THREADS=4 python -m critics.build --config configs/critic/build_shapes.yaml \
  device=cuda num_workers=4 distill.progress=false distill.max_steps=$S distill.log_every=500 \
  output_dir=$OUT/$n heatmap=$OUT/$n.png "$@" > $OUT/log/$n.txt 2>&1 & }
LOW="distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6"
B low_7_4 $LOW 'search.pinned=[7,4]'
B low_7_1 $LOW 'search.pinned=[7,1]'
B full_8_4 'search.pinned=[8,4]'
wait
grep -h "build:save\|step $S\|rror" $OUT/log/*.txt
V="python -m critics.bench_value --device cuda --n-prompts 128 --batch-size 256 --critics stitchvm,tweedie --sigmas 0.1,0.25,0.5"
for n in low_7_4 low_7_1 full_8_4; do [ -f $OUT/$n/stitchvm.json ] && V="$V --variant $n=$OUT/$n"; done
$V --prompt-seed 1 --retrieval-images 0 --out "" --json $OUT/bench_val.json > $OUT/bench_val.md 2>$OUT/log/bench_val.err
cat $OUT/bench_val.md
