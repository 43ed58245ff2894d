#!/usr/bin/env bash
# Session-6 GPU call for issue #4: stage 2 on the policy's own samples as well as renders (policy_samples, half of
# every batch: 32768 decoded samples of train-split prompts, CFG 1 / 4.5, ODE / SDE eta 0.7), (7, 1), 4000 steps, at
# three noise-level laws; then the value benchmark on validation (seed 1) and test (seed 0) prompts.
#   bash benchmarks/gpu_session6_critic_d.sh OUT
set -u
OUT=${1:?out}; mkdir -p $OUT/log
S=${STEPS:-4000}
PS="policy_samples.n=32768 policy_samples.batch_size=1024"
PSP='policy_samples.prompts={_component_: shapes.data.prompts, split: train, n: 65536, seed: 5}'
B() { local n=$1; shift; timeout ${BUILD_S:-400} env OMP_NUM_THREADS=4 python -m critics.build --config configs/critic/build_shapes.yaml \
  device=cuda num_workers=4 distill.progress=false distill.max_steps=$S distill.log_every=500 $PS "$PSP" \
  'search.pinned=[7,1]' output_dir=$OUT/$n heatmap=$OUT/$n.png "$@" > $OUT/log/$n.txt 2>&1 & }
B ps_low distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6
B ps_ln14 distill.sigma_sampling=logit_normal distill.sigma_mean=-1.4 distill.sigma_std=0.8
B ps_unif distill.sigma_sampling=uniform
wait
grep -h "policy samples\|build:save\|step $S\|rror" $OUT/log/*.txt
V="python -m critics.bench_value --device cuda --n-prompts 128 --batch-size 256 --critics stitchvm,tweedie"
for n in ps_low ps_ln14 ps_unif; do [ -f $OUT/$n/stitchvm.json ] && V="$V --variant $n=$OUT/$n"; done
$V --prompt-seed 1 --retrieval-images 256 --out "" --json $OUT/bench_val.json > $OUT/bench_val.md 2>$OUT/log/bench_val.err
cat $OUT/bench_val.md
timeout ${TEST_S:-150} $V --prompt-seed 0 --retrieval-images 0 --out "" --json $OUT/bench_test.json > $OUT/bench_test.md 2>$OUT/log/bench_test.err
cat $OUT/bench_test.md
