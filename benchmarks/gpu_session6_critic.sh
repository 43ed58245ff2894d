#!/usr/bin/env bash
# Session-6 GPU call for issue #4: three stage-2 builds with the caption-score term (critics/distill.py,
# distill.lambda_score) on one GPU at once, then the value benchmark of the three against the shipped StitchVM and
# Tweedie on validation prompts (--prompt-seed 1) and, time permitting, on the reported test prompts (seed 0).
#   bash benchmarks/gpu_session6_critic.sh OUT
set -u
OUT=${1:?out}; mkdir -p $OUT/log
S=${STEPS:-3000}
CAP='score_captions={_component_: shapes.data.prompts, split: train, n: 8192, seed: 11}'
B() { local n=$1; shift; timeout ${BUILD_S:-400} env OMP_NUM_THREADS=4 python -m critics.build --config configs/critic/build_shapes.yaml \
  device=cuda num_workers=4 distill.progress=false distill.max_steps=$S distill.log_every=250 "$CAP" \
  output_dir=$OUT/$n heatmap=$OUT/$n.png "$@" > $OUT/log/$n.txt 2>&1 & }
B score1 distill.lambda_score=1 'search.pinned=[7,4]'
B score4 distill.lambda_score=4 'search.pinned=[7,4]'
B score4_j1 distill.lambda_score=4 'search.pinned=[7,1]'
wait
grep -h "build:save\|step $S\|rror" $OUT/log/*.txt
V="python -m critics.bench_value --device cuda --n-prompts 128 --batch-size 256 --critics stitchvm,tweedie"
for n in score1 score4 score4_j1; do [ -f $OUT/$n/stitchvm.json ] && V="$V --variant $n=$OUT/$n"; done
$V --prompt-seed 1 --retrieval-images 256 --out "" --json $OUT/bench_val.json > $OUT/bench_val.md 2>$OUT/log/bench_val.err
cat $OUT/bench_val.md
timeout ${TEST_S:-150} $V --prompt-seed 0 --retrieval-images 0 --out "" --json $OUT/bench_test.json > $OUT/bench_test.md 2>$OUT/log/bench_test.err
cat $OUT/bench_test.md
