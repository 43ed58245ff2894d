#!/usr/bin/env bash
# Session-8 GPU call for issue #4: prompt-conditioned StitchVM builds whose stage-2 renders include *mismatched*
# scenes (shapes.data.ShapesDataset(mismatch=p): the caption kept, the image departing from it the way a policy's
# sample does -- an off-palette colour, another colour / shape / count, a group missing or extra, the relation
# flipped), so the head cannot read the image embedding off the caption; (7, 1), train-split renders + the policy's
# samples on train prompts as in session 7. Then the value benchmark on 512 validation prompts (seed 1) against the
# shipped experts (session 7's two prompt builds) and Tweedie.
#   bash benchmarks/gpu_session8_critic.sh OUT
set -u
OUT=${1:?out}; source benchmarks/session6_critic_lib.sh
S=${STEPS:-4000}
PS="head_conditioning=prompt distill.max_steps=$S policy_samples.n=32768 policy_samples.batch_size=1024 search.pinned=[7,1]"
PSP='policy_samples.prompts={_component_: shapes.data.prompts, split: train, n: 65536, seed: 5}'
mm() { echo "data={_component_: shapes.data.ShapesDataset, split: train, num_samples: 1048576, seed: 7, mismatch: $1}"; }
LOW="distill.sigma_sampling=logit_normal distill.sigma_mean=-2.2 distill.sigma_std=0.6"
build mm25_low "$(mm 0.25)" $PS "$PSP" $LOW
build mm50_low "$(mm 0.5)" $PS "$PSP" $LOW
build mm25_unif "$(mm 0.25)" $PS "$PSP" distill.sigma_sampling=uniform
wait
grep -h "policy samples\|build:save\|rror" $OUT/log/*.txt
v="python -m critics.bench_value --device cuda --n-prompts ${N_PROMPTS:-512} --batch-size 512 --critics tweedie"
v="$v --variant prompt_low=shapes/weights/stitchvm_prompt_low --variant prompt_unif=shapes/weights/stitchvm_prompt"
for n in mm25_low mm50_low mm25_unif; do [ -f $OUT/$n/stitchvm.json ] && v="$v --variant $n=$OUT/$n"; done
timeout ${BENCH_S:-170} $v --prompt-seed 1 --retrieval-images 0 --out "" --json $OUT/bench_val.json \
  > $OUT/bench_val.md 2>$OUT/log/bench_val.err
cat $OUT/bench_val.md; tail -3 $OUT/log/bench_val.err
