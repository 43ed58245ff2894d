#!/usr/bin/env bash
# Next GPU call for issue #6 (written in session 13, not yet run), four H100s (nvidia-h100-x4): two more seeds of
# session 13's beta 0.01 for GRPO-Fast and DDPO-Fast on the full 8.5 minutes. Session 13's call B
# (benchmarks/gpu_session13_b.sh) gave finals .541 (GRPO) and .551 (DDPO) at beta 0.01, run.seed 0; call D's seeds 1-2
# ran only 4.2 minutes (docs/bench/trainers_session13.md). If both seeds' finals reach 0.527 (+0.15), set
# algo.kl_beta: 0.01 in configs/experiments/shapes_gpu_{grpo,ddpo}.yaml.
#   GPU 0: GRPO-Fast beta 0.01 seed 1     GPU 1: GRPO-Fast beta 0.01 seed 2
#   GPU 2: DDPO-Fast beta 0.01 seed 1     GPU 3: DDPO-Fast beta 0.01 seed 2
#   bash benchmarks/gpu_session14_a.sh OUT   (gpu_session13_d.sh's four runs on the full budget)
set -u
MINUTES=${MINUTES:-8.5} SESSION=14 exec bash benchmarks/gpu_session13_d.sh "${1:?out}"
