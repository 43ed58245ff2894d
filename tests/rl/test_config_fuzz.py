"""Config fuzzing: seeded random mutations of every trainer's composed config either validate or stop with one
ConfigError, in one line that names the key to fix — never another exception; a few run through the command line
(exit 2, no traceback).

The mutations: delete a key, add an unknown key, typo a key, a value of the wrong type, an out-of-range or
non-finite number, a bad `_component_` import path, a wrong --algo / --critic name, and several of them at once.
Validation is ``rl.train.validate_config`` (what ``compose_config`` runs on the composed dict: keys, types, ranges,
and every `_component_`'s import and arguments), so no model is built and hundreds of cases take seconds.

Each mutation says what must happen: ``REJECT`` (a ConfigError whose message contains a given key) or ``EITHER``
(a ConfigError or a valid config; e.g. deleting a key that has a default).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
import random
import string
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from rl import common, train
from rl.config import COMPONENT_KEY, ConfigError, _import, to_yaml
from rl.cotrain import CotrainConfig

ROOT = Path(__file__).resolve().parents[2]
ALGOS = sorted(train.ALGOS)
# one critic per trainer, so every critic node kind is fuzzed; GRPO's co-trains (the typed critic.cotrain node)
BASE_ARGS = {"nft": ["--critic", "stitchvm"], "grpo": ["--critic", "stitchvm", "+critic.cotrain.enabled=true"],
             "ddpo": ["--critic", "terminal"], "draft": ["--critic", "mc"]}
COMPONENT_NODES = [("model",), ("reward",), ("critic",), ("prompts", "train"), ("prompts", "eval"), ("eval_metric",)]
REQUIRED = [("model",), ("reward",), ("critic",), ("prompts",), ("prompts", "train")]
REJECT, EITHER = "reject", "either"
CASES_PER_KIND = 40


@dataclasses.dataclass
class Mutation:
    what: str                   # for the failure report
    expect: str                 # REJECT or EITHER
    names: str = ""             # REJECT: the message must contain this (the key to fix)
    raw: dict | None = None     # the mutated config (None: ``argv`` composes it)
    argv: list | None = None    # a command line for compose_config instead of a dict


# ------------------------------------------------------------------------------------------------ the config
@functools.cache
def _base(algo: str) -> dict:
    return train.compose_config(train.parse_args(["--algo", algo, *BASE_ARGS[algo]])).raw


def base(algo: str) -> dict:
    return copy.deepcopy(_base(algo))


def typed_sections(algo: str) -> dict[tuple, type]:
    return {("algo",): train.algo_config_class(algo), ("run",): common.RunConfig, ("eval",): common.EvalConfig,
            ("critic", "cotrain"): CotrainConfig}


def typed_fields(algo: str) -> list[tuple[tuple, str, typing.Any]]:
    """(section path, field name, annotation) of every typed field."""
    out = []
    for section, cls in typed_sections(algo).items():
        hints = typing.get_type_hints(cls)
        out += [(section, f.name, hints[f.name]) for f in dataclasses.fields(cls)]
    return out


def dotted(path) -> str:
    return ".".join(str(p) for p in path)


def get(d, path):
    for p in path:
        d = d[p]
    return d


def set_path(d, path, value):
    for p in path[:-1]:
        d = d.setdefault(p, {})
    d[path[-1]] = value


def key_paths(d, prefix=()) -> list[tuple]:
    """Every key of every mapping in the config (lists are leaves)."""
    out = []
    for k, v in d.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += key_paths(v, (*prefix, k))
    return out


def takes_any_kwargs(node: dict) -> bool:
    params = inspect.signature(_import(node[COMPONENT_KEY], "test")).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def strict_mapping(raw: dict, path: tuple) -> bool:
    """Does an unknown key at ``path`` have to be rejected (typed section, root, prompts, or a component node whose
    target takes no ``**kwargs``)?"""
    if path in ((), ("prompts",), ("algo",), ("run",), ("eval",), ("critic", "cotrain")):
        return True
    node = get(raw, path)
    return path in COMPONENT_NODES and isinstance(node, dict) and not takes_any_kwargs(node)


def typo(rng: random.Random, key: str, taken) -> str:
    for _ in range(20):
        i = rng.randrange(len(key))
        kind = rng.choice(["swap", "drop", "double", "replace", "upper"])
        if kind == "swap" and len(key) > 1:
            i = min(i, len(key) - 2)
            new = key[:i] + key[i + 1] + key[i] + key[i + 2:]
        elif kind == "drop" and len(key) > 1:
            new = key[:i] + key[i + 1:]
        elif kind == "double":
            new = key[:i] + key[i] + key[i:]
        elif kind == "replace":
            new = key[:i] + rng.choice(string.ascii_lowercase) + key[i + 1:]
        else:
            new = key.upper()
        if new != key and new not in taken:
            return new
    return key + "x"


def wrong_values(tp) -> list:
    """Values of a type the annotation ``tp`` must refuse."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = type(None) in args
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    none = [] if optional else [None]
    if tp is float:
        return ["abc", "1.0.0", [1.0], {"a": 1.0}, True, *none]
    if tp is int:
        return ["abc", 1.5, "2.5", [1], {"a": 1}, True, *none]
    if tp is bool:
        return ["maybe", 1, 0.0, [True], {"a": True}, *none]
    if tp is str:
        return [3, 1.5, ["a"], {"a": "b"}, True, *none]
    if origin is typing.Literal:
        return ["no-such-choice", 3, [args[0]], *none]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return ["abc", 3, {"a": 1}, [{"a": 1}], *none] + ([[1, 2]] if args[0] is str else [["x"]])
    if origin is tuple:
        return ["ab", 3, [1], [1, 2, 3], [1.5, 2]]
    raise AssertionError(f"no wrong values for {tp}")


def out_of_range(algo: str, raw: dict) -> list[tuple[str, typing.Any, str]]:
    """(dotted key, value, a name the message must contain): values of the right type that no run can use."""
    a = raw["algo"]
    n = a["num_steps"]
    cases = [("algo.lr", -1e-4, "lr"), ("algo.lr", 0, "lr"), ("algo.num_steps", 0, "num_steps"),
             ("algo.num_steps", -3, "num_steps"), ("algo.weight_decay", -0.1, "weight_decay"),
             ("algo.max_grad_norm", 0, "max_grad_norm"), ("algo.max_grad_norm", -1, "max_grad_norm"),
             ("algo.lora_rank", 0, "lora_rank"), ("algo.lora_alpha", 0, "lora_alpha"),
             ("algo.lora_targets", [], "lora_targets"), ("algo.prompts_per_epoch", 0, "prompts_per_epoch"),
             ("run.max_epochs", 0, "max_epochs"), ("run.ckpt_every", 0, "ckpt_every"),
             ("run.keep_checkpoints", 0, "keep_checkpoints"), ("run.eval_every", -1, "eval_every"),
             ("run.seed", -1, "seed"), ("run.seed", 2**64, "seed"), ("run.max_minutes", 0, "max_minutes"),
             ("run.max_minutes", -5.0, "max_minutes"), ("run.max_nonfinite", 0, "max_nonfinite"),
             ("run.mixed_precision", "fp32", "mixed_precision"),
             ("run.matmul_precision", "tf32", "matmul_precision"), ("run.cuda_graphs", "sometimes", "cuda_graphs"),
             ("run.log_backends", ["tensorbord"], "log_backends"),
             ("run.log_backends", ["wandb"], "wandb_project"), ("run.output_dir", "", "output_dir"),
             ("eval.num_steps", 0, "num_steps"), ("eval.batch_size", 0, "batch_size"),
             ("eval.batch_size", -4, "batch_size"), ("eval.num_images_logged", 0, "num_images_logged"),
             ("eval.seed", -1, "seed"), ("critic.cotrain.lr", -1e-5, "lr"),
             ("critic.cotrain.batch_size", 0, "batch_size"), ("critic.cotrain.weight_decay", -1, "weight_decay"),
             ("critic.cotrain.max_grad_norm", 0, "max_grad_norm"),
             ("critic.cotrain.sigma_edges", [0.5, 0.25], "sigma_edges"),
             ("critic.cotrain.params", "everything", "params")]
    if "gradient_accumulation_steps" in raw["run"]:
        cases.append(("run.gradient_accumulation_steps", 0, "gradient_accumulation_steps"))
    cases += [(f"algo.{k}", v, k) for k in a if k.endswith("batch_size") for v in (0, -8)]
    for key, bad in (("inner_epochs", 0), ("timestep_fraction", 0), ("timestep_fraction", 1.5), ("kl_beta", -1),
                     ("clip_range", 0), ("adv_clip", 0), ("adv_clip", -5), ("adv_eps", 0), ("adv_eps", -1e-4),
                     ("gae_lambda", 1.5), ("gae_lambda", -0.5), ("nft_beta", 0), ("reg_lambda", -1), ("ema_decay", 1.0),
                     ("old_decay_max", 1.5), ("old_decay_ramp", -0.1), ("max_train_timesteps", 0),
                     ("stat_buffer_size", 0), ("cotrain_batch_size", 0), ("backprop_steps", 0),
                     ("backprop_steps", n + 1), ("sde_window", n + 1), ("sde_window", -1),
                     ("sde_window_start", [2, 1]), ("sde_window_start", [-1, 0])):
        if key in a:
            cases.append((f"algo.{key}", bad, key))
    if "tau_max" in a:  # tau beyond the schedule, or an empty range
        cases += [("algo.tau_max", n + 1, "tau_max"), ("algo.tau_min", a["tau_max"] + 1, "tau_min"),
                  ("algo.tau_min", 0, "tau_min")]
    if algo in ("nft", "grpo"):  # group normalisation needs two samples per prompt
        cases.append(("algo.group_size", 1, "group_size"))
    if algo == "ddpo":
        cases += [("algo.group_size", 0, "group_size"),
                  ("algo.stat_min_count", a["stat_buffer_size"] + 1, "stat_min_count")]
    if algo in ("grpo", "ddpo"):  # an SDE step without noise has no log-probability
        cases += [("algo.eta", 0, "eta"), ("algo.rollout_batch_size", a["group_size"] + 1, "rollout_batch_size")]
    if algo == "draft":
        cases.append(("algo.eta", -0.5, "eta"))
    return cases


BAD_IMPORT_PATHS = ["no_such_package.module.Thing", "policies.testing.no_such_function", "policies.testing",
                    "policies.testing.TINY_WORDS", "", ".", "a..b", "tiny_policy", "policies.testing.tiny_policy()",
                    " policies.testing.tiny_policy", "Policies.testing.tiny_policy", "rl.config.ConfigError.args", 3,
                    None, ["policies.testing.tiny_policy"], {"a": 1}]


# ------------------------------------------------------------------------------------------------ mutations
def mutate_delete(rng, algo):
    raw = base(algo)
    path = rng.choice(key_paths(raw))
    parent = get(raw, path[:-1])
    del parent[path[-1]]
    node = path[:-1] if path[-1] == COMPONENT_KEY else path
    expect = REJECT if (path in REQUIRED or (path[-1] == COMPONENT_KEY and node in REQUIRED)) else EITHER
    return Mutation(f"delete {dotted(path)}", expect, dotted(node), raw)


def mutate_unknown(rng, algo):
    raw = base(algo)
    parents = [()] + [p for p in key_paths(raw) if isinstance(get(raw, p), dict)]
    path = rng.choice(parents)
    name = rng.choice(["zq", "foo_bar", "lr2", "extra", "_private", "Model"]) + rng.choice(["", "_x", "9"])
    key = rng.choice([name, 7]) if path else name
    get(raw, path)[key] = rng.choice([1, "x", [1], {"a": 1}, None])
    expect = REJECT if strict_mapping(raw, path) else EITHER
    return Mutation(f"add unknown key {dotted((*path, key))}", expect, str(key), raw)


def mutate_typo(rng, algo):
    raw = base(algo)
    path = rng.choice(key_paths(raw))
    parent = get(raw, path[:-1])
    new = typo(rng, str(path[-1]), parent)
    parent[new] = parent.pop(path[-1])
    if path[-1] == COMPONENT_KEY:  # the node has no import path any more
        return Mutation(f"typo {dotted(path)} -> {new}", REJECT if path[:-1] in REQUIRED or path[:-1] in
                        COMPONENT_NODES else EITHER, dotted(path[:-1]), raw)
    expect = REJECT if strict_mapping(raw, path[:-1]) else EITHER
    return Mutation(f"typo {dotted(path)} -> {new}", expect, new, raw)


def mutate_wrong_type(rng, algo):
    raw = base(algo)
    if rng.random() < 0.2:  # an object node, or a whole section, that is not a mapping
        path = rng.choice([*COMPONENT_NODES, ("prompts",), ("algo",), ("run",), ("eval",), ("critic", "cotrain")])
        value = rng.choice([3, "policies.testing.tiny_policy", [1, 2], 1.5] + ([] if path == ("critic", "cotrain")
                                                                             else [True]))
        if path == ("critic", "cotrain") and isinstance(value, str):
            value = "yes"
        set_path(raw, path, value)
        return Mutation(f"{dotted(path)} = {value!r}", REJECT, dotted(path), raw)
    section, name, tp = rng.choice(typed_fields(algo))
    value = rng.choice(wrong_values(tp))
    set_path(raw, (*section, name), value)
    return Mutation(f"{dotted((*section, name))} = {value!r} ({tp})", REJECT, dotted((*section, name)), raw)


def mutate_out_of_range(rng, algo):
    raw = base(algo)
    if rng.random() < 0.3:  # NaN or infinity in any float field
        section, name, _ = rng.choice([f for f in typed_fields(algo) if float in (f[2], *typing.get_args(f[2]))])
        key, value, names = dotted((*section, name)), rng.choice([float("nan"), float("inf"), -float("inf"),
                                                                  "nan", "-inf", "1e999", 10**400]), name
    else:
        key, value, names = rng.choice(out_of_range(algo, raw))
    set_path(raw, tuple(key.split(".")), value)
    return Mutation(f"{key} = {value!r}", REJECT, names, raw)


def mutate_component(rng, algo):
    raw = base(algo)
    path = rng.choice([p for p in COMPONENT_NODES if isinstance(get(raw, p[:-1]).get(p[-1]), dict)])
    value = rng.choice(BAD_IMPORT_PATHS)
    get(raw, path)[COMPONENT_KEY] = value
    return Mutation(f"{dotted(path)}._component_ = {value!r}", REJECT, dotted(path), raw)


def mutate_names(rng, algo):
    critic = BASE_ARGS[algo][1]
    if rng.random() < 0.5:
        name = rng.choice([typo(rng, algo, ALGOS), algo.upper(), "", "ppo", " nft"])
        return Mutation(f"--algo {name!r}", REJECT, "--algo", argv=["--algo", name, "--critic", critic])
    name = rng.choice([typo(rng, critic, train.critic_choices()), "build_shapes", "stitchvm.yaml", "", "critic"])
    return Mutation(f"--critic {name!r}", REJECT, "--critic", argv=["--algo", algo, "--critic", name])


OVERRIDE_VALUES = ["1", "-1", "0", "1e-4", ".nan", "[1, 2]", "{a: 1}", "{a: 1, a: 2}", "null", "", "true", "abc", "[",
                   "*x", "!!python/name:os.system", "=1", "'1'", "\x00", "- 1", "a: b: c", "%x", "1 # comment"]


def mutate_override(rng, algo):
    """A random command-line override (set, add or delete; existing, misspelt or garbage keys; YAML values)."""
    paths = key_paths(_base(algo))
    key = dotted(rng.choice(paths))
    key = rng.choice([key, key, typo(rng, key, ()), key + ".x", key.replace(".", ".."), "", ".", key + ".0",
                      "algo.lora_targets." + rng.choice(["0", "99", "-1"])])
    op = rng.choice(["", "+", "~"])
    text = f"~{key}" if op == "~" and rng.random() < 0.8 else f"{op}{key}{rng.choice(['=', '=', '==', ''])}" \
                                                                f"{rng.choice(OVERRIDE_VALUES)}"
    return Mutation(f"override {text!r}", EITHER, argv=["--algo", algo, *BASE_ARGS[algo], text])


KINDS = {"delete": mutate_delete, "unknown": mutate_unknown, "typo": mutate_typo, "wrong_type": mutate_wrong_type,
         "out_of_range": mutate_out_of_range, "component": mutate_component, "names": mutate_names,
         "override": mutate_override}


def mutate_several(rng, algo):
    """Two to four of the mutations above together (each one's changed top-level sections replace the previous
    ones'): only the contract is checked, one clean ConfigError or a valid config."""
    raw, whats = base(algo), []
    for _ in range(rng.randint(2, 4)):
        kind = rng.choice([k for k in KINDS if k not in ("names", "override")])
        single = KINDS[kind](rng, algo)
        for k in set(single.raw) | set(raw):
            if k not in single.raw:
                raw.pop(k, None)
            elif single.raw[k] != _base(algo).get(k):
                raw[k] = single.raw[k]
        whats.append(single.what)
    return Mutation(" + ".join(whats), EITHER, raw=raw)


# ------------------------------------------------------------------------------------------------ the check
def outcome(m: Mutation, algo: str) -> str | None:
    """None when the mutation ended as it must; otherwise what went wrong."""
    try:
        if m.argv is not None:
            train.compose_config(train.parse_args(m.argv))
        else:
            composed = train.validate_config(m.raw, algo)
            to_yaml(composed.raw)  # what --print-config does with it
    except ConfigError as e:
        msg = str(e)
        if not msg or "\n" in msg:
            return f"{m.what}: the ConfigError is not one line: {msg!r}"
        if m.expect == REJECT and m.names not in msg:
            return f"{m.what}: the message does not name '{m.names}': {msg}"
        return None
    except Exception as e:  # noqa: BLE001 — any other exception is the finding
        return f"{m.what}: {type(e).__name__}: {e}"
    return f"{m.what}: validated, but must be rejected" if m.expect == REJECT else None


@pytest.mark.parametrize("kind", [*KINDS, "several"])
@pytest.mark.parametrize("algo", ALGOS)
def test_every_mutation_is_a_clean_config_error_or_valid(algo, kind):
    mutate = mutate_several if kind == "several" else KINDS[kind]
    failures, rejected = [], 0
    for seed in range(CASES_PER_KIND):
        m = mutate(random.Random(f"{algo}/{kind}/{seed}"), algo)
        problem = outcome(m, algo)
        if problem:
            failures.append(problem)
        rejected += m.expect == REJECT
    assert not failures, f"{len(failures)} of {CASES_PER_KIND} mutations:\n" + "\n".join(failures)
    if kind not in ("delete", "several", "override"):
        assert rejected > CASES_PER_KIND // 2  # the generator mostly makes mistakes validation must catch


def test_the_base_configs_are_valid():
    for algo in ALGOS:  # every mutation starts from a valid config, so a rejection is the mutation's doing
        train.validate_config(base(algo), algo)


YAML_FILES = {  # file content -> what the one-line message must contain
    b"algo: [1, 2\n": "bad.yaml:2:1: expected ','",
    b"- 1\n- 2\n": "the top level must be a mapping",
    b"algo:\n  lr: 1.0e-4\n  lr: 3.0e-4\n": "bad.yaml:3:3: duplicate key 'lr'",
    b"algo:\n  lr: \xff\xfe\n": "is not UTF-8 text",
    b"!!python/object/apply:os.system [echo hi]\n": "could not determine a constructor",
    b"algo: {lr: \x00}\n": "unacceptable character",
    b"algo:\n\tlr: 1\n": "bad.yaml:2:1",
    b"run: {max_epochs: .inf}\n": "run.max_epochs: expected int",
    b"algo: {lr: 1e999}\n": "algo.lr: must be a finite number",
}


@pytest.mark.parametrize("content", list(YAML_FILES), ids=range(len(YAML_FILES)))
def test_malformed_yaml_files_are_one_line_errors(tmp_path, content):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        train.compose_config(train.parse_args(["--algo", "nft", "--critic", "terminal", "--config", str(path)]))
    assert YAML_FILES[content] in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_directory_or_a_missing_file_as_config(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; pass a YAML file"):
        train.compose_config(train.parse_args(["--critic", "terminal", "--config", str(tmp_path)]))
    with pytest.raises(ConfigError, match="config file not found"):
        train.compose_config(train.parse_args(["--critic", "terminal", "--config", str(tmp_path / "x.yaml")]))


# ------------------------------------------------------------------------------------------------ the CLI
CLI_BASE = ["--algo", "grpo", "--critic", "terminal"]  # the Shapes defaults: their loaders import in milliseconds
CLI_CASES = [  # (arguments, what the one error line must contain); None: valid (--print-config, exit 0)
    (["--algo", "grop"], "did you mean 'grpo'"),
    (["--critic", "stichvm"], "did you mean 'stitchvm'"),
    (["+algo.lrr=1e-4"], "unknown key 'algo.lrr' — did you mean 'lr'"),
    (["algo.lr=.nan"], "algo.lr: must be a finite number"),
    (["algo.train_batch_size=[4,8]"], "algo.train_batch_size: expected int"),
    (["run.ckpt_every=0"], "run.ckpt_every: must be >= 1"),
    (["algo.group_size=1"], "algo.group_size: group normalisation needs >= 2"),
    (["model._component_=shapes.models.load_shapes_polcy"], "did you mean 'load_shapes_policy'"),
    (["~prompts.train"], "prompts.train: needs a node with _component_"),
    (["--resume", "latest"], "--resume latest: no checkpoint"),
    (["~algo.lr", "run.max_minutes=null", "--print-config"], None),
]


def _cli(args, out):
    return subprocess.Popen([sys.executable, "-m", "rl.train", *CLI_BASE, f"run.output_dir={out}", *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_command_line_errors_exit_2_with_one_line_and_no_traceback(tmp_path):
    # two at a time: each case is an interpreter start (3-8 s of imports) and a validation, nothing is built
    results = []
    for start in range(0, len(CLI_CASES), 2):
        procs = [(args, want, _cli(args, tmp_path / f"run{start + i}"))
                 for i, (args, want) in enumerate(CLI_CASES[start:start + 2])]
        for args, want, proc in procs:
            out, err = proc.communicate(timeout=300)
            results.append((args, want, proc.returncode, out, err))
    for args, want, rc, out, err in results:
        if want is None:
            assert rc == 0 and "algo:" in out, (args, err)
            continue
        errors = [line for line in err.splitlines() if "error" in line]  # (libraries may warn on stderr)
        assert rc == 2 and "Traceback" not in err, (args, err)
        assert len(errors) == 1 and want in errors[0], (args, err)
