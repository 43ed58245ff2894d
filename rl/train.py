"""Entry point: ``accelerate launch rl/train.py --algo nft --critic stitchvm [--config FILE] [key=value ...]``.

Composes the YAML in configs/ (defaults.yaml, then algo/<algo>.yaml under ``algo``, critic/<critic>.yaml under
``critic``, then ``--config FILE``, then ``key=value`` overrides), validates all of it *before any model is
built*, then instantiates the model, reward, critic, prompts and evaluation metric (YAML nodes name import
paths) and runs the algorithm in rl/<algo>.py.

Exit status: 0 done (or stopped cleanly by SIGTERM/SIGINT after a checkpoint), 2 configuration error,
1 anything else.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `accelerate launch rl/train.py` runs this file as a script, which puts rl/ first on sys.path, where our
    # modules (config, metrics, signals…) would shadow top-level ones. Put the repository root there instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from dataclasses import dataclass  # noqa: E402

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
ALGOS = {"nft": ("rl.nft", "NFTConfig"), "grpo": ("rl.grpo", "GRPOConfig"), "ddpo": ("rl.ddpo", "DDPOConfig"),
         "draft": ("rl.draft", "DraftConfig")}
COTRAIN_ALGOS = ("grpo", "ddpo", "draft")  # the trainers that run critic.cotrain (rl/cotrain.py)
TOP_LEVEL_KEYS = ["model", "reward", "critic", "prompts", "eval_metric", "algo", "run", "eval"]


def critic_choices() -> list[str]:
    # build_*.yaml in configs/critic/ configure the critic *build* (critics/build.py), not a run's critic
    return sorted(p.stem for p in (CONFIG_ROOT / "critic").glob("*.yaml") if not p.stem.startswith("build_"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rl/train.py", description=__doc__.split("\n\n")[0],
        epilog="Overrides: dotted keys into the composed config, e.g. algo.lr=1e-4 run.max_epochs=20 "
               "critic.path=shapes/weights/stitchvm; +key=value adds a key, ~key deletes one. "
               "`--print-config` shows the composed config.")
    parser.add_argument("--algo", default="nft", help=f"training algorithm: one of {sorted(ALGOS)}")
    parser.add_argument("--critic", default="stitchvm", help=f"critic config name: one of {critic_choices()}")
    parser.add_argument("--config", action="append", default=[], help="extra YAML merged on top (repeatable)")
    parser.add_argument("--resume", default=None, help="'latest' (of run.output_dir), a run dir or a checkpoint dir")
    parser.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    return parser.parse_intermixed_args(argv)  # key=value may come before or after the flags


@dataclass
class Composed:
    raw: dict
    algo_cfg: object
    run_cfg: object
    eval_cfg: object
    cotrain_cfg: object = None


def compose_config(args: argparse.Namespace) -> Composed:
    """Compose the config from the command line and validate it (``validate_config``); raises ConfigError with one
    message saying what to fix."""
    from rl import common
    from rl.config import ConfigError, apply_overrides, compose, load_yaml, to_dict, unknown_choice

    if args.algo not in ALGOS:
        raise unknown_choice("--algo", args.algo, sorted(ALGOS), "choices")
    if args.critic not in critic_choices():
        raise unknown_choice("--critic", args.critic, critic_choices(), "choices (one YAML each in configs/critic/)")
    parts = [load_yaml(CONFIG_ROOT / "defaults.yaml"),
             {"algo": load_yaml(CONFIG_ROOT / "algo" / f"{args.algo}.yaml")},
             {"critic": load_yaml(CONFIG_ROOT / "critic" / f"{args.critic}.yaml")}]
    for path in args.config:
        part = load_yaml(path)
        if not part:  # most likely the wrong file: a config that sets nothing is never what was meant
            raise ConfigError(f"--config {path} sets nothing (the file is empty or only comments): pass the YAML "
                              f"you meant, or drop the flag")
        parts.append(part)
    # Typed sections start from their dataclass defaults, so every field is overridable from the CLI and
    # --print-config shows the whole resolved config.
    defaults = {"algo": to_dict(algo_config_class(args.algo)()), "run": to_dict(common.RunConfig()),
                "eval": to_dict(common.EvalConfig())}
    raw = apply_overrides(compose(defaults, *parts), args.overrides)
    return validate_config(raw, args.algo)


def algo_config_class(algo: str) -> type:
    module, cls = ALGOS[algo]
    return getattr(importlib.import_module(module), cls)


def _check_algo_keys(node, algo: str) -> None:
    """An experiment config of another trainer (e.g. sd35m_grpo.yaml under --algo nft) names that trainer, rather
    than the first of its keys this one lacks with a look-alike suggestion."""
    from dataclasses import fields

    from rl.config import ConfigError

    if not isinstance(node, dict):
        return
    own = {f.name for f in fields(algo_config_class(algo))}
    unknown = sorted(str(k) for k in node if k not in own)
    if not unknown:
        return
    fits = [a for a in sorted(ALGOS) if a != algo and set(unknown) <= {f.name for f in fields(algo_config_class(a))}]
    if fits:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        which = f"--algo {fits[0]}" if len(fits) == 1 else f"the one of --algo {' / '.join(fits)} it was written for"
        raise ConfigError(f"algo.{unknown[0]}{more} is not a setting of --algo {algo} but of --algo "
                          f"{' / '.join(fits)}: the config is for another trainer, so pass {which}")


def validate_config(raw: dict, algo: str) -> Composed:
    """Check a composed config completely without building anything: top-level keys, the typed sections (keys,
    types, ranges: ``rl.config.from_dict`` and the dataclasses' ``__post_init__``), the shape of the object nodes,
    and every ``_component_`` (it imports and takes the node's arguments: ``rl.config.check_node``).

    Raises:
        ConfigError: the first mistake, in one line that names the key and says what to fix.
    """
    from rl import common
    from rl.config import ConfigError, check_node, from_dict, to_dict, unknown_choice
    from rl.cotrain import cotrain_config  # critic.cotrain configures co-training, it is no critic argument

    if algo not in ALGOS:
        raise unknown_choice("--algo", algo, sorted(ALGOS), "choices")
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise unknown_choice("config", str(key), TOP_LEVEL_KEYS, "top-level keys")
    _check_algo_keys(raw.get("algo", {}), algo)
    algo_cfg = from_dict(algo_config_class(algo), raw.get("algo", {}), "algo")
    run_cfg = from_dict(common.RunConfig, raw.get("run", {}), "run")
    eval_cfg = from_dict(common.EvalConfig, raw.get("eval", {}), "eval")
    for key in ("model", "reward", "critic"):
        _check_object_node(raw.get(key), key)
    cotrain_cfg = cotrain_config(raw["critic"].get("cotrain"))
    if cotrain_cfg.enabled and algo not in COTRAIN_ALGOS:
        raise ConfigError(f"critic.cotrain: --algo {algo} does not co-train its critic (trainers that do: "
                          f"{list(COTRAIN_ALGOS)}); set critic.cotrain.enabled=false")
    prompts = raw.get("prompts")
    if not isinstance(prompts, dict):
        raise ConfigError(f"prompts: needs a mapping with 'train' (and optionally 'eval') prompt nodes, got "
                          f"{prompts!r}")
    for key in prompts:
        if key not in ("train", "eval", "val"):
            raise unknown_choice("prompts", str(key), ["train", "eval", "val"], "keys")
    _check_object_node(prompts.get("train"), "prompts.train")
    for key, node in (("prompts.eval", prompts.get("eval")), ("prompts.val", prompts.get("val")),
                      ("eval_metric", raw.get("eval_metric"))):
        if node is not None:  # null: no held-out evaluation / validation
            _check_object_node(node, key, "or null (no held-out evaluation)")
    if run_cfg.keep_best:
        missing = [k for k, node in (("prompts.val", prompts.get("val")), ("eval_metric", raw.get("eval_metric")))
                   if node is None]
        if missing:
            raise ConfigError(f"run.keep_best chooses the adapter by its score on prompts.val: set {' and '.join(missing)}"
                              f" (or run.keep_best=false)")
        if run_cfg.eval_every < 1:
            raise ConfigError("run.keep_best validates at every evaluation: set run.eval_every >= 1 (or "
                              "run.keep_best=false)")
    # Last, as it imports the targets (seconds): every node's import path and arguments, before any is built.
    check_node(raw["model"], "model")
    check_node(raw["reward"], "reward")
    check_node({k: v for k, v in raw["critic"].items() if k != "cotrain"}, "critic", injected=("policy", "reward"))
    for key, node in (("prompts.train", prompts["train"]), ("prompts.eval", prompts.get("eval")),
                      ("prompts.val", prompts.get("val")), ("eval_metric", raw.get("eval_metric"))):
        if node is not None:
            check_node(node, key)
    # the typed sections as the run uses them (1e-4 a float, a tuple a list): what config.yaml, the checkpoint's
    # config and a resume's settings check see is then what ran, not how it was spelled
    raw = {**raw, "algo": to_dict(algo_cfg), "run": to_dict(run_cfg), "eval": to_dict(eval_cfg)}
    return Composed(raw, algo_cfg, run_cfg, eval_cfg, cotrain_cfg)


def _check_object_node(node, key: str, alternative: str = "") -> None:
    from rl.config import ConfigError

    if not isinstance(node, dict) or "_component_" not in node:
        alternative = f" {alternative}" if alternative else ""
        raise ConfigError(f"{key}: needs a node with _component_ (an import path){alternative}, got {node!r}")


def check_batch_layout(algo: str, composed: Composed, num_processes: int | None = None) -> None:
    """rl.distributed.check_layout for the process count the launcher set (WORLD_SIZE; 1 without a launcher), so a
    batch that does not split over the GPUs is a config error before any model loads (the trainers check again
    against the real accelerator)."""
    import os
    from types import SimpleNamespace

    from rl import distributed

    cfg = composed.algo_cfg
    world = SimpleNamespace(num_processes=num_processes or int(os.environ.get("WORLD_SIZE", "1")))
    accumulation = composed.run_cfg.gradient_accumulation_steps
    if algo == "draft":
        distributed.check_layout(world, accumulation, cfg.prompts_per_epoch, cfg.train_batch_size,
                                 rows_name="algo.prompts_per_epoch")
    else:
        distributed.check_layout(world, accumulation, cfg.prompts_per_epoch * cfg.group_size, cfg.train_batch_size,
                                 cfg.rollout_batch_size)


def build_run(composed: Composed):
    """Instantiate everything (after validation) and return an rl.common.Run."""
    import torch
    from accelerate import Accelerator

    from critics.base import check_pairing
    from rl import common, distributed
    from rl.config import ConfigError, build, loading, to_dict
    from rl.metrics import MetricLogger, Timer
    from rl.selection import BestAdapter

    raw, run_cfg = composed.raw, composed.run_cfg
    # run.mixed_precision is the one source of truth; a different one in the accelerate launch config would be
    # silently overridden by it, so that is an error.
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched != "no" and launched != run_cfg.mixed_precision:
        raise ConfigError(f"the accelerate launch config asks for mixed_precision={launched} but "
                          f"run.mixed_precision={run_cfg.mixed_precision}: pass run.mixed_precision={launched} (the "
                          f"run config decides)")
    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if run_cfg.mixed_precision == "fp16" and on_cpu:
        raise ConfigError("run.mixed_precision=fp16 needs a GPU: accelerate turns fp16 autocast off on a CPU and the "
                          "run would train in float32 while recording fp16; use bf16 or no")
    accelerator = Accelerator(mixed_precision=run_cfg.mixed_precision)
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched_processes:  # e.g. a multi-GPU launch config on a machine without GPUs
        raise ConfigError(f"{launched_processes} processes were launched, but they did not form one group (each sees "
                          f"{accelerator.num_processes}), so each would train and write run.output_dir as the main "
                          f"process; this launch config needs its GPUs (configs/accelerate/*_2gpu.yaml). On a CPU, "
                          f"multi-process runs use `ACCELERATE_USE_CPU=true torchrun --nproc_per_node N rl/train.py` "
                          f"(README)")
    # process-wide, as torch has it: every matmul of the run (rollouts, updates, critic, reward, evaluation)
    torch.set_float32_matmul_precision(run_cfg.matmul_precision)
    accelerator.print(f"{distributed.backend_name(accelerator)}: {accelerator.num_processes} process(es) on "
                      f"{accelerator.device.type}, mixed precision {run_cfg.mixed_precision}, float32 matmul "
                      f"precision {run_cfg.matmul_precision}{', CUDA graphs' if run_cfg.cuda_graphs else ''}")
    if run_cfg.cuda_graphs and accelerator.device.type != "cuda":
        raise ConfigError(f"run.cuda_graphs replays CUDA graphs, but this run is on {accelerator.device.type}: set "
                          f"run.cuda_graphs=false (or launch on a GPU)")
    if run_cfg.cuda_graphs and distributed.zero_stage(accelerator) == 3:
        raise ConfigError("run.cuda_graphs cannot replay a ZeRO-3-partitioned transformer (its parameters are "
                          "gathered by hooks at every forward): set run.cuda_graphs=false or use ZeRO-2 / DDP")
    common.seed_everything(run_cfg.seed + accelerator.process_index)
    with distributed.no_zero3_init(accelerator):  # only the trained transformer is partitioned, by accelerate.prepare
        policy = build(raw["model"], "model").to(accelerator.device)
        policy.enable_cuda_graphs(run_cfg.cuda_graphs)
        reward = build(raw["reward"], "reward").to(accelerator.device)
        critic_node = {k: v for k, v in raw["critic"].items() if k != "cotrain"}
        critic = build(critic_node, "critic", policy=policy, reward=reward)
        if isinstance(critic, torch.nn.Module):
            critic.to(accelerator.device)
        check_pairing(critic, policy.latent_channels, policy.latent_size)
        prompts = raw.get("prompts", {})
        train_prompts = build(prompts["train"], "prompts.train")
        eval_prompts = build(prompts["eval"], "prompts.eval") if prompts.get("eval") else []
        if not len(train_prompts):
            raise ConfigError("prompts.train gave no prompts: the trainer samples its epochs from them (e.g. "
                              "prompts.train.n >= 1, or a prompts file with lines in it)")
        if prompts.get("eval") and raw.get("eval_metric") and not len(eval_prompts):
            raise ConfigError("prompts.eval gave no prompts, so the run would report no held-out score: give "
                              "prompts.eval.n >= 1, or prompts.eval=null to run without held-out evaluation")
        val_prompts = build(prompts["val"], "prompts.val") if prompts.get("val") else []
        # validation chooses, evaluation reports: no prompt may be in both
        reported = set(eval_prompts)
        val_prompts = [p for p in val_prompts if p not in reported]
        if run_cfg.keep_best and not val_prompts:
            raise ConfigError("prompts.val: every validation prompt is also an evaluation prompt (they are removed "
                              "from validation); give prompts.val another split or seed")
        # a prompt the reward cannot read (a word outside a closed vocabulary, too long for its context) is found
        # here, not at the first rollout after the run directory is written: tokenizing is cheap next to a rollout
        tokenize = getattr(reward, "tokenizer", None)
        if callable(tokenize):
            for what, texts in (("prompts.train", train_prompts), ("prompts.eval", eval_prompts),
                                ("prompts.val", val_prompts)):
                if len(texts):
                    with loading(what):
                        tokenize(list(texts))
        if val_prompts and not run_cfg.keep_best:
            accelerator.print("note: prompts.val is only used with run.keep_best=true; this run does not validate")
        metric = build(raw["eval_metric"], "eval_metric") if raw.get("eval_metric") else None
        if isinstance(metric, torch.nn.Module):
            metric.to(accelerator.device)
    Path(run_cfg.output_dir).mkdir(parents=True, exist_ok=True)
    logger = MetricLogger(run_cfg.output_dir, backends=run_cfg.log_backends, project=run_cfg.wandb_project,
                          config=raw, is_main_process=accelerator.is_main_process)
    return common.Run(policy=policy, critic=critic, train_prompts=list(train_prompts), eval_prompts=list(eval_prompts),
                      eval_metric=metric, accelerator=accelerator, logger=logger, run_cfg=run_cfg,
                      eval_cfg=composed.eval_cfg, config_dict=to_dict(raw), reward=reward,
                      cotrain=composed.cotrain_cfg, val_prompts=val_prompts,
                      best=BestAdapter(run_cfg.best_metric, val_prompts, composed.eval_cfg)
                      if run_cfg.keep_best else None,
                      # time/* charges a section's GPU work to it: without the syncs an asynchronous rollout (CUDA
                      # graphs queue it in a few launches) would be billed to the next section that waits on it
                      timer=Timer(cuda_sync=accelerator.device.type == "cuda"))


RUN_FILES = ("metrics.jsonl", "config.yaml", "checkpoints", "lora", "tensorboard", "images")  # what a run writes


def clear_previous_run(output_dir: Path, overwrite: bool) -> None:
    """A new run never mixes into another: its metrics would be appended to the old ones, its checkpoints rotated
    with them (--resume latest would then pick whichever is newer) and its export would replace the old one. So a
    directory that holds a run is an error, or with run.overwrite its run files are deleted. Process 0 alone looks:
    the others start at their own pace and could see its new run's first files (the launcher stops them when process
    0 exits with the error); none of them writes there."""
    from rl.config import ConfigError

    if int(os.environ.get("RANK", "0")) != 0:
        return
    held = [name for name in RUN_FILES if (output_dir / name).exists()]
    if not {"metrics.jsonl", "checkpoints", "lora"} & set(held):  # a config.yaml alone is no run
        return
    if not overwrite:
        raise ConfigError(f"run.output_dir {output_dir} holds a run ({', '.join(held)}): continue it with --resume "
                          f"latest, start this one elsewhere (run.output_dir=...), or replace it with "
                          f"run.overwrite=true")
    for name in held:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"run.overwrite: deleted the previous run's {', '.join(held)} in {output_dir}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from rl.checkpoint import CheckpointError
    from rl.config import ConfigError, to_yaml

    args = parse_args(argv)
    try:
        composed = compose_config(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(composed.raw))
        return 0
    try:  # the global batch must split over the launched processes: checked before any model is built
        check_batch_layout(args.algo, composed)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    output_dir = Path(composed.run_cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        print(f"error: run.output_dir={output_dir} is a file, not a directory: give a directory for the run "
              f"(run.output_dir=...)", file=sys.stderr)
        return 2
    if args.resume is not None:  # before any model is built: a missing checkpoint is a command-line mistake
        from rl.checkpoint import resolve_checkpoint

        try:
            step_dir = resolve_checkpoint(composed.run_cfg.output_dir if args.resume == "latest" else args.resume)
        except CheckpointError as e:
            print(f"error: --resume {args.resume}: {e}", file=sys.stderr)
            return 2
        # a resumed run writes its checkpoints, metrics and export into run.output_dir: continuing another
        # directory's checkpoint there would mix two runs (and without run.output_dir, into the default one)
        saved_in = step_dir.resolve().parent.parent  # <run dir>/checkpoints/step_XXXXXXXX
        if not step_dir.resolve().is_relative_to(Path(composed.run_cfg.output_dir).resolve()):
            print(f"error: --resume {args.resume} is a checkpoint of the run in {saved_in}, but this run writes into "
                  f"run.output_dir={composed.run_cfg.output_dir}; set run.output_dir={saved_in} to continue that run",
                  file=sys.stderr)
            return 2
    else:
        try:
            clear_previous_run(Path(composed.run_cfg.output_dir), composed.run_cfg.overwrite)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        run = build_run(composed)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if run.accelerator.is_main_process and args.resume is None:  # a resumed run writes it once restored
        to_yaml(composed.raw, Path(run.run_cfg.output_dir) / "config.yaml")
    algo = importlib.import_module(ALGOS[args.algo][0])
    try:
        final = algo.train(run, composed.algo_cfg, resume=args.resume)
        # every process past its last collective before any tears the group down: a rank that finished first and
        # exited while another still exported aborted once at exit ("terminate called without an active exception")
        run.accelerator.wait_for_everyone()
    except ConfigError as e:  # a trainer's own checks (critic / reward pairing, run.best_metric): before any update
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # --resume of a damaged checkpoint: found while loading it, before metrics.jsonl is
        print(f"error: --resume {args.resume}: {e}", file=sys.stderr)  # cut back to it or anything is trained
        return 2
    finally:
        run.logger.close()
        # tear the process group down before interpreter exit: a gloo/NCCL group left to the destructors can abort
        # a rank at exit ("terminate called without an active exception") after a run that finished fine
        run.accelerator.end_training()
    if final:  # empty: stopped by SIGTERM/SIGINT after its checkpoint (the trainer said so)
        run.accelerator.print("final: " + " ".join(f"{k}={v:.4f}" for k, v in final.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
