#!/usr/bin/env bash
# Third GPU call of session 12 for issue #6, four H100s (nvidia-h100-x4). Call A (gpu_session12_a.sh) showed that TF32
# buys the trainers nothing (rollout and update seconds per epoch unchanged) and call C's matmul_precision.py row that
# the Shapes MMDiT samples 1.9x faster when each step's forward replays as a CUDA graph: the trainers are bound by
# kernel launches. run.cuda_graphs (FlowPolicy.enable_cuda_graphs) replays the policy's no-grad forwards (rollouts,
# evaluation, the KL reference); the shipped GPU configs now set it, with eval.batch_size 2048.
# Ran in session 12: docs/bench/trainers_session12.md.
# First the GPU tests of the replay (tests/policies/test_graphs.py -m gpu: replayed forwards equal eager ones while
# the adapter trains); if they fail the runs go without graphs. Then one run alone per card, shipped configs +
# keep_best.yaml, for MINUTES (default 8.3: the tests take ~40 s of the call's 600):
#   GPU 0: GRPO-Fast, --critic stitchvm       GPU 1: DDPO-Fast, --critic stitchvm
#   GPU 2: DRaFT-1, --critic stitchvm         GPU 3: GRPO-Fast twin (--critic terminal, sparse)
# Compare epochs and time/* with docs/bench/s12a_*_tf32.jsonl.gz (the same runs without graphs, at TF32).
#   bash benchmarks/gpu_session12_d.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.3}; source benchmarks/session3_lib.sh
timeout 90 python -m pytest -q -m gpu -p no:cacheprovider tests/policies/test_graphs.py > $OUT/gpu_tests.txt 2>&1
G=$?; tail -3 $OUT/gpu_tests.txt
X=""; [ $G -ne 0 ] && X="run.cuda_graphs=false" && echo "GPU tests failed (rc $G): runs without CUDA graphs"
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000 $X"
train 0 grpo stitchvm grpo_fast_graphs $K
train 1 ddpo stitchvm ddpo_fast_graphs $K
train 2 draft stitchvm draft_graphs $K
train 3 grpo terminal grpo_fast_terminal_graphs $K algo.advantages=sparse
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
wait
SESSION=12 finish grpo_fast_graphs ddpo_fast_graphs draft_graphs grpo_fast_terminal_graphs
(cd $OUT && tar -cf logs.tar log gpu_tests.txt && rm -rf log gpu_tests.txt)  # the device tool returns at most 8 files
ls $OUT
