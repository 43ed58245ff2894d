#!/usr/bin/env bash
# Session 18's GPU calls for issue #6: GRPO-Fast and DDPO-Fast with classifier-free guidance (prepared in session 17's
# script; moved here). Every Shapes GPU run until now was CFG-free, while Flow-GRPO trains and evaluates at CFG 4.5.
# CFG=G (default 4.5) is set in rollouts, training, evaluation and validation alike, so the step-0 evaluation is the
# pretrained policy's score at that CFG, the baseline the +0.15 is measured from (CPU, 512 held-out prompts, 10
# steps: CFG 1 .371, 2 .502, 3 .547, 4.5 .521; docs/bench/trainers_session17.md). Eager forwards
# (run.cuda_graphs=false): the replay gains nothing at 1024 samples (session 12), and CFG doubles each forward's batch.
#   PAIR=cfg0 (two GPUs, kind nvidia-h100-x2): GRPO and DDPO seed 0, one run alone on each card. CFG roughly doubles
#          an epoch, so no CFG-free run serves as their H100 clock; on H100s these runs are that clock
#   PAIR=cfg (four GPUs): seeds 1 and 2 of both, replayed on the H100 runs' clock:
#          python benchmarks/compare_runs.py RUN --clock RUN=docs/bench/s18a_{grpo,ddpo}_cfg.jsonl.gz
#   PAIR=screen (four GPUs): after PAIR=cfg0 (CFG 4.5: GRPO +0.045, DDPO +0.035 from a step-0 score of .475), GRPO-Fast
#          seed 2 (shipped: .510, docs/bench/s16a_grpo_fast_s2.jsonl.gz) with one untried setting each: SDE noise
#          eta 1.0 (0.7, Flow-GRPO's a, in every run so far), a 3-step window, 128 prompts x 8 per epoch (64 x 16),
#          LoRA on the image stream's attention only (no add_*_proj / to_add_out: the text tokens of the train pairs
#          are what the held-out pairs' prompts do not share)
#   PAIR=eta (four GPUs): after PAIR=screen (eta 1.0 the only setting above the shipped run at the H100 clock: final
#          .523 against .510, plateau .512 against .471), GRPO-Fast seeds 0, 1, 3 and DDPO-Fast seed 2 with eta 1.0
#   Not yet run (the shipped configs set eta 1.0 since call C, so these need no eta override):
#   PAIR=ddpo_eta (four GPUs): DDPO-Fast seeds 0, 1, 3 (seed 2 ran in call C) and GRPO's decode-and-score twin
#          (--critic terminal algo.advantages=sparse) seed 0, for the +0.15 mean and the wall-clock at equal reward
#   PAIR=twins_eta (four GPUs): the twins of GRPO seeds 1, 2 and DDPO seeds 0, 1, for the same
#   PAIR=ddpo_screen (four GPUs, session 19): DDPO-Fast seeds 0, 1 at lr 1e-4 and with one PPO pass at lr 3e-4
#   PAIR=ddpo_lr (four GPUs): DDPO-Fast seeds 2, 3 at the shipped lr 1e-4 (session 19) and the twins of seeds 0, 1
#   PAIR=eta13 (four GPUs): GRPO-Fast seeds 0-3 at eta 1.3, if eta 1.0 is not the top
#   PAIR=cps (four GPUs): GRPO-Fast seeds 0-3 with coefficients-preserving steps (algo.sde_type=cps) at eta 0.8: on
#          CPU it widens each group as the flow SDE at 1.3 does, at less cost in reward (trainers_session18.md)
#   PAIR=cfg0 bash benchmarks/gpu_session18_a.sh OUT
set -u
OUT=${1:?out}; MINUTES=${MINUTES:-8.5}; source benchmarks/session3_lib.sh
K="--config configs/experiments/keep_best.yaml run.ckpt_every=100000"
G=(algo.guidance_scale=${CFG:-4.5} eval.guidance_scale=${CFG:-4.5} run.cuda_graphs=false)
NAMES=""
case ${PAIR:-cfg0} in
  cfg0) train 0 grpo stitchvm grpo_cfg $K "${G[@]}"
        train 1 ddpo stitchvm ddpo_cfg $K "${G[@]}"
        NAMES="grpo_cfg ddpo_cfg";;
  cfg) for a in grpo ddpo; do
         g=$([ $a = grpo ] && echo 0 || echo 2)
         train $g $a stitchvm ${a}_cfg_s1 $K "${G[@]}" run.seed=1
         train $((g + 1)) $a stitchvm ${a}_cfg_s2 $K "${G[@]}" run.seed=2
         NAMES="$NAMES ${a}_cfg_s1 ${a}_cfg_s2"
       done;;
  screen) train 0 grpo stitchvm grpo_eta1_s2 $K algo.eta=1.0 run.seed=2
          train 1 grpo stitchvm grpo_w3_s2 $K algo.sde_window=3 run.seed=2
          train 2 grpo stitchvm grpo_p128_s2 $K algo.prompts_per_epoch=128 algo.group_size=8 run.seed=2
          train 3 grpo stitchvm grpo_img_s2 $K "algo.lora_targets=[to_q,to_k,to_v,to_out.0]" run.seed=2
          NAMES="grpo_eta1_s2 grpo_w3_s2 grpo_p128_s2 grpo_img_s2";;
  eta) train 0 grpo stitchvm grpo_eta1 $K algo.eta=1.0
       train 1 grpo stitchvm grpo_eta1_s1 $K algo.eta=1.0 run.seed=1
       train 2 grpo stitchvm grpo_eta1_s3 $K algo.eta=1.0 run.seed=3
       train 3 ddpo stitchvm ddpo_eta1_s2 $K algo.eta=1.0 run.seed=2
       NAMES="grpo_eta1 grpo_eta1_s1 grpo_eta1_s3 ddpo_eta1_s2";;
  ddpo_eta) train 0 ddpo stitchvm ddpo_eta1 $K
            train 1 ddpo stitchvm ddpo_eta1_s1 $K run.seed=1
            train 2 ddpo stitchvm ddpo_eta1_s3 $K run.seed=3
            train 3 grpo terminal grpo_eta1_terminal $K algo.advantages=sparse
            NAMES="ddpo_eta1 ddpo_eta1_s1 ddpo_eta1_s3 grpo_eta1_terminal";;
  twins_eta) train 0 grpo terminal grpo_eta1_terminal_s1 $K algo.advantages=sparse run.seed=1
             train 1 ddpo terminal ddpo_eta1_terminal $K algo.advantages=sparse
             train 2 ddpo terminal ddpo_eta1_terminal_s1 $K algo.advantages=sparse run.seed=1
             train 3 grpo terminal grpo_eta1_terminal_s2 $K algo.advantages=sparse run.seed=2
             NAMES="grpo_eta1_terminal_s1 ddpo_eta1_terminal ddpo_eta1_terminal_s1 grpo_eta1_terminal_s2";;
  ddpo_screen) train 0 ddpo stitchvm ddpo_lr1e4 $K algo.lr=0.0001
               train 1 ddpo stitchvm ddpo_lr1e4_s1 $K algo.lr=0.0001 run.seed=1
               train 2 ddpo stitchvm ddpo_pass1 $K algo.inner_epochs=1 algo.lr=0.0003
               train 3 ddpo stitchvm ddpo_pass1_s1 $K algo.inner_epochs=1 algo.lr=0.0003 run.seed=1
               NAMES="ddpo_lr1e4 ddpo_lr1e4_s1 ddpo_pass1 ddpo_pass1_s1";;
  ddpo_lr) train 0 ddpo stitchvm ddpo_lr1e4_s2 $K run.seed=2
           train 1 ddpo stitchvm ddpo_lr1e4_s3 $K run.seed=3
           train 2 ddpo terminal ddpo_lr1e4_terminal $K algo.advantages=sparse
           train 3 ddpo terminal ddpo_lr1e4_terminal_s1 $K algo.advantages=sparse run.seed=1
           NAMES="ddpo_lr1e4_s2 ddpo_lr1e4_s3 ddpo_lr1e4_terminal ddpo_lr1e4_terminal_s1";;
  eta13) for s in 0 1 2 3; do train $s grpo stitchvm grpo_eta13_s$s $K algo.eta=1.3 run.seed=$s; done
         NAMES="grpo_eta13_s0 grpo_eta13_s1 grpo_eta13_s2 grpo_eta13_s3";;
  cps) for s in 0 1 2 3; do train $s grpo stitchvm grpo_cps08_s$s $K algo.sde_type=cps algo.eta=0.8 run.seed=$s; done
       NAMES="grpo_cps08_s0 grpo_cps08_s1 grpo_cps08_s2 grpo_cps08_s3";;
  *) echo "error: PAIR must be cfg0, cfg, screen, eta, ddpo_eta, twins_eta, ddpo_screen, ddpo_lr, eta13 or cps, got '$PAIR'" >&2; exit 2;;
esac
end_call ${TAG:-18a} $NAMES  # TAG=19a etc.: a later session's call names its records s19a_*
