"""Evaluate a trained policy on held-out prompts: ``python -m rl.evaluate --lora runs/shapes/lora``.

Loads the run's model and evaluation metric from the same YAML composition as ``rl/train.py`` (Shapes world by
default), applies an exported diffusers-format LoRA (``--lora DIR``), a training checkpoint (``--checkpoint DIR``: the
adapter a ``run.keep_best`` run chose when the checkpoint holds one, else the adapter the run evaluates and exports --
its EMA "ema" when the trainer keeps one (``algo.ema_decay`` > 0), else the trained "default"; ``--last`` skips the
kept one) or nothing (the pretrained policy), samples the eval prompts with fixed noise and prints the mean of every
metric criterion. ``--algo`` and ``--critic`` name the trainer and critic whose ``--config`` files are given (their
``algo`` and ``critic`` keys differ), as for rl/train.py. Exit 2 on a bad config, path or weights file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--lora", type=Path, help="exported LoRA directory (pytorch_lora_weights.safetensors)")
    src.add_argument("--checkpoint", help="checkpoint dir, run dir or 'latest' of run.output_dir")
    parser.add_argument("--last", action="store_true",
                        help="with --checkpoint: the run's last adapter (its EMA when it keeps one) even if it kept a "
                             "best one (keep_best)")
    parser.add_argument("--algo", default="nft", help="the trainer the --config files are for (as for rl/train.py)")
    parser.add_argument("--critic", default="terminal",
                        help="the critic the --config files are for (as for rl/train.py; their critic keys must fit "
                             "it). The evaluation itself uses no critic")
    parser.add_argument("--config", action="append", default=[], help="extra YAML (as for rl/train.py)")
    parser.add_argument("--json", type=Path, help="also write the metrics here")
    parser.add_argument("overrides", nargs="*", help="key=value (e.g. eval.guidance_scale=4.5 prompts.eval.n=512)")
    args = parser.parse_intermixed_args(argv)  # key=value may come before or after the flags, as for rl/train.py
    if args.json is not None and args.json.is_dir():  # found before the evaluation, not after it
        print(f"error: --json {args.json} is a directory; give a file path", file=sys.stderr)
        return 2
    if args.last and args.checkpoint is None:
        print("error: --last chooses between a checkpoint's adapters: pass --checkpoint DIR too", file=sys.stderr)
        return 2

    import torch
    from accelerate import Accelerator

    from policies import lora
    from rl import checkpoint as ckpt
    from rl import common, train
    from rl.config import ConfigError, build
    from rl.metrics import MetricLogger
    from rl.selection import GROUP as BEST

    try:
        composed = train.compose_config(train.parse_args(["--algo", args.algo, "--critic", args.critic, *sum(
            (["--config", c] for c in args.config), []), *args.overrides]))
        raw = composed.raw
        accelerator = Accelerator()
        policy = build(raw["model"], "model").to(accelerator.device)
        transformer = policy.transformer
        if args.lora is not None:
            if args.lora.is_file():
                raise FileNotFoundError(f"--lora takes the export directory (the folder that holds "
                                        f"pytorch_lora_weights.safetensors, <run.output_dir>/lora), got the file "
                                        f"'{args.lora}'")
            if not (args.lora / "pytorch_lora_weights.safetensors").is_file():
                raise FileNotFoundError(f"no pytorch_lora_weights.safetensors in '{args.lora}' (export of a run: "
                                        f"<run.output_dir>/lora)")
            check_lora_file(args.lora / "pytorch_lora_weights.safetensors")
            try:
                transformer.load_lora_adapter(str(args.lora), weight_name="pytorch_lora_weights.safetensors",
                                              adapter_name="default")
            except RuntimeError as e:  # e.g. size mismatches: a LoRA of another model
                raise ValueError(f"{args.lora}: not a LoRA of this model ({str(e).splitlines()[0]}); evaluate it with "
                                 f"the --config of the run that trained it") from e
            if "default" not in getattr(transformer, "peft_config", {}):  # no key matched a module of this model
                raise ValueError(f"{args.lora}: none of its LoRA weights names a module of this model; evaluate it "
                                 f"with the --config of the run that trained it")
        elif args.checkpoint is not None:
            source = raw["run"]["output_dir"] if args.checkpoint == "latest" else args.checkpoint
            loaded = ckpt.load_checkpoint(source)
            algo = loaded.state.get("config", {}).get("algo", {})
            spec = lora.LoraSpec(r=algo.get("lora_rank", 32), alpha=algo.get("lora_alpha", 64.0),
                                 target_modules=tuple(algo.get("lora_targets", lora.SD3_TARGETS)))
            lora.add_lora(transformer, spec, "default")
            # what the run itself evaluated and exported: the kept adapter, else its EMA when it has one
            last = "lora_ema" if "lora_ema" in loaded.tensors else "lora_default"
            group = last if args.last or BEST not in loaded.tensors else BEST
            which = {BEST: "kept by validation (keep_best)", "lora_ema": "last (EMA)", "lora_default": "last"}[group]
            print(f"checkpoint {loaded.path}: adapter {which}", file=sys.stderr)
            lora.load_adapter_state_dict(transformer, {k: v.to(accelerator.device)
                                                       for k, v in loaded.tensors[group].items()})
        eval_prompts = build(raw["prompts"]["eval"], "prompts.eval")
        if not eval_prompts:
            raise ConfigError("prompts.eval: no evaluation prompts (it is null or empty); give a prompt node, e.g. "
                              "{_component_: shapes.data.prompts, split: test, n: 512, seed: 1}")
        metric = build(raw["eval_metric"], "eval_metric")
        if metric is None:
            raise ConfigError("eval_metric: null; the evaluation needs a metric, e.g. "
                              "{_component_: shapes.eval.ShapesEval}")
        if isinstance(metric, torch.nn.Module):
            metric.to(accelerator.device)
    except (ConfigError, FileNotFoundError, ValueError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = common.Run(policy=policy, critic=None, train_prompts=[], eval_prompts=list(eval_prompts),
                     eval_metric=metric, accelerator=accelerator, logger=MetricLogger(".", backends=(),
                                                                                     is_main_process=False),
                     run_cfg=composed.run_cfg, eval_cfg=composed.eval_cfg)
    adapter = None if args.lora is None and args.checkpoint is None else "default"
    metrics, _ = common.evaluate(run, adapter=adapter)
    print(json.dumps(metrics, indent=2))
    if args.json:
        ckpt.atomic_write_json(args.json, metrics)
    return 0


def check_lora_file(path: Path) -> None:
    """A readable safetensors file with LoRA weights (``lora_A`` / ``lora_B`` keys, as diffusers exports them), or a
    ValueError that says which it is not."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): it is damaged or truncated; export the "
                         f"run again (its checkpoints keep the adapter: --checkpoint <run.output_dir>)") from e
    if not any(".lora_A." in k or ".lora_B." in k for k in keys):
        raise ValueError(f"{path} holds no LoRA weights (no lora_A / lora_B keys among its {len(keys)} tensors): is "
                         f"it a LoRA export of rl/train.py or diffusers?")


if __name__ == "__main__":
    sys.exit(main())
