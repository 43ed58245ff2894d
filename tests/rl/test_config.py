"""rl.config: instantiate, typed dataclass configs, YAML loading, compose, command-line overrides."""

import fractions
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import torch
import yaml

from rl.config import (
    ConfigError,
    apply_overrides,
    check,
    compose,
    config_help,
    from_dict,
    instantiate,
    load_yaml,
    option,
    to_dict,
    to_yaml,
)


@dataclass
class AlgoConfig:
    lr: float = option(3e-4, help="AdamW learning rate.")
    clip_range: float = option(0.2, help="PPO ratio clip epsilon.")
    num_epochs: int = option(1, help="Optimisation epochs per rollout.")
    loss: Literal["ppo", "nft"] = option("ppo", help="Policy loss.")
    kl_coef: float | None = option(None, help="KL penalty; None disables it.")
    max_grad_norm: Optional[float] = option(None, help="Gradient clipping; typing.Optional works too.")  # noqa: UP045
    betas: tuple[float, float] = option((0.9, 0.999), help="AdamW betas.")

    def __post_init__(self):
        check(0.0 < self.clip_range < 1.0, "clip_range", f"must be in (0, 1), got {self.clip_range}")


@dataclass
class TrainConfig:
    max_steps: int = option(help="Number of optimiser steps.")
    algo: AlgoConfig = option(default_factory=AlgoConfig, help="Algorithm hyper-parameters.")
    name: str = option("run", help="Run name.")
    run_dir: Path = option(Path("runs/run"), help="Where checkpoints and logs go.")
    seeds: list[int] = option(default_factory=lambda: [0], help="Seeds.")
    reward: dict[str, Any] = option(
        default_factory=lambda: {"_component_": "fractions.Fraction", "numerator": 1, "denominator": 2},
        help="Reward node.",
    )


# ---------------------------------------------------------------------------------------------- instantiate


def test_instantiate_nested_nodes_lists_and_overrides():
    node = {
        "_component_": "types.SimpleNamespace",
        "layer": {"_component_": "torch.nn.Linear", "in_features": 2, "out_features": 3, "bias": False},
        "weights": [{"_component_": "fractions.Fraction", "numerator": 1, "denominator": 3}, 7],
        "plain": {"x": {"_component_": "fractions.Fraction", "numerator": 2}},
    }
    obj = instantiate(node, extra=5)
    assert isinstance(obj, types.SimpleNamespace)
    assert isinstance(obj.layer, torch.nn.Linear) and obj.layer.weight.shape == (3, 2) and obj.layer.bias is None
    assert obj.weights == [fractions.Fraction(1, 3), 7]
    assert obj.plain == {"x": fractions.Fraction(2)}
    assert obj.extra == 5
    assert node["layer"]["_component_"] == "torch.nn.Linear"  # input untouched


def test_instantiate_positional_args_and_caller_overrides_win():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = instantiate({"_component_": "torch.optim.AdamW", "lr": 0.1}, [param], lr=0.5)
    assert opt.param_groups[0]["lr"] == 0.5


def test_instantiate_bad_import_path_names_config_path():
    cfg = {"critic": {"reward": {"_component_": "torch.nn.Linearr", "in_features": 1}}}
    with pytest.raises(ConfigError) as e:
        instantiate(cfg)
    msg = str(e.value)
    assert msg.startswith("critic.reward._component_:")
    assert "torch.nn.Linearr" in msg and "did you mean 'Linear'" in msg

    with pytest.raises(ConfigError, match=r"rewards\[1\]\._component_: cannot import 'no_such_pkg\.Thing'"):
        instantiate({"rewards": [{"_component_": "fractions.Fraction"}, {"_component_": "no_such_pkg.Thing"}]})


def test_instantiate_unknown_kwarg_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        instantiate({"_component_": "torch.nn.Linear", "in_feature": 2, "out_features": 3}, _path="head")
    msg = str(e.value)
    assert "head: unknown argument 'in_feature'" in msg
    assert "did you mean 'in_features'?" in msg
    assert "valid arguments: in_features, out_features, bias, device, dtype" in msg


def test_instantiate_missing_argument_and_kwargs_targets():
    with pytest.raises(ConfigError, match="head: torch.nn.modules.linear.Linear: missing a required argument"):
        instantiate({"_component_": "torch.nn.Linear", "in_features": 2}, _path="head")
    # a target taking **kwargs accepts anything
    assert instantiate({"_component_": "types.SimpleNamespace", "anything": 1}).anything == 1


def test_instantiate_builds_children_only_after_checking_parent():
    # the parent's typo is reported even though the child node would fail to import
    node = {"_component_": "torch.nn.Linear", "in_featuress": {"_component_": "no_such_pkg.X"}}
    with pytest.raises(ConfigError, match="unknown argument 'in_featuress'"):
        instantiate(node)


# ---------------------------------------------------------------------------------------------- dataclasses


def test_from_dict_coerces_types():
    cfg = from_dict(
        TrainConfig,
        {
            "max_steps": "12",  # a string number, e.g. from a YAML 1.1 quirk or a quoted CLI value
            "algo": {
                "lr": "1e-4",
                "clip_range": 0.5,
                "num_epochs": 2,
                "kl_coef": 3,
                "betas": [0.8, 0.99],
                "max_grad_norm": 1,
            },
            "run_dir": "runs/x",
            "seeds": [1, 2],
        },
    )
    assert cfg.max_steps == 12 and type(cfg.max_steps) is int
    assert cfg.algo.lr == 1e-4 and type(cfg.algo.lr) is float
    assert cfg.algo.kl_coef == 3.0 and type(cfg.algo.kl_coef) is float
    assert cfg.algo.max_grad_norm == 1.0 and type(cfg.algo.max_grad_norm) is float
    assert cfg.algo.betas == (0.8, 0.99)
    assert cfg.run_dir == Path("runs/x")
    assert cfg.seeds == [1, 2]
    assert cfg.reward["_component_"] == "fractions.Fraction"


def test_from_dict_post_init_error_is_prefixed():
    with pytest.raises(ConfigError, match=r"^algo\.clip_range: must be in \(0, 1\), got 1\.0$"):
        from_dict(TrainConfig, {"max_steps": 1, "algo": {"clip_range": 1}})


def test_from_dict_unknown_key_did_you_mean():
    with pytest.raises(ConfigError) as e:
        from_dict(TrainConfig, {"max_steps": 1, "algo": {"lrr": 0.1}})
    assert str(e.value) == (
        "unknown key 'algo.lrr' — did you mean 'lr'? "
        "valid keys: lr, clip_range, num_epochs, loss, kl_coef, max_grad_norm, betas"
    )
    with pytest.raises(ConfigError, match=r"^unknown key 'zzz'; valid keys: max_steps, algo"):
        from_dict(TrainConfig, {"max_steps": 1, "zzz": 0})


@pytest.mark.parametrize(
    "algo, expected",
    [
        ({"num_epochs": 1.5}, "algo.num_epochs: expected int, got float 1.5"),
        ({"num_epochs": True}, "algo.num_epochs: expected int, got bool True"),
        ({"lr": "fast"}, "algo.lr: expected float, got str 'fast'"),
        ({"lr": None}, "algo.lr: expected float, got NoneType None"),
        ({"loss": "dpo"}, "algo.loss: expected one of ['ppo', 'nft'], got 'dpo'"),
        ({"kl_coef": "x"}, "algo.kl_coef: expected float | None, got str 'x'"),
        ({"max_grad_norm": [1.0]}, "algo.max_grad_norm: expected Optional[float], got list [1.0]"),
        ({"betas": [0.9, 0.9, 0.9]}, "algo.betas: expected 2 items"),
        ({"betas": 0.9}, "algo.betas: expected tuple[float, float], got float 0.9"),
        ("fast", "algo: expected a mapping for AlgoConfig, got str 'fast'"),
    ],
)
def test_from_dict_type_errors(algo, expected):
    with pytest.raises(ConfigError) as e:
        from_dict(TrainConfig, {"max_steps": 1, "algo": algo})
    assert str(e.value).startswith(expected)


def test_from_dict_list_item_and_str_errors():
    with pytest.raises(ConfigError, match=r"^seeds\[1\]: expected int, got str 'a'"):
        from_dict(TrainConfig, {"max_steps": 1, "seeds": [0, "a"]})
    with pytest.raises(ConfigError, match="^name: expected str, got int 2024"):
        from_dict(TrainConfig, {"max_steps": 1, "name": 2024})


def test_from_dict_missing_required_key_shows_help():
    with pytest.raises(ConfigError, match=r"^missing required key 'max_steps' \(int\): Number of optimiser steps\.$"):
        from_dict(TrainConfig, {})


def test_to_yaml_round_trip(tmp_path):
    cfg = from_dict(TrainConfig, {"max_steps": 5, "algo": {"lr": 0.25, "kl_coef": 0.5}, "run_dir": "r"})
    text = to_yaml(cfg, tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_text() == text
    assert from_dict(TrainConfig, yaml.safe_load(text)) == cfg
    assert to_dict(cfg)["algo"]["betas"] == [0.9, 0.999]
    assert list(to_dict(cfg)) == ["max_steps", "algo", "name", "run_dir", "seeds", "reward"]  # field order kept


def test_config_help_lists_every_field():
    text = config_help(TrainConfig)
    assert "max_steps (int, required): Number of optimiser steps." in text
    assert "algo.lr (float, 0.0003): AdamW learning rate." in text


# ---------------------------------------------------------------------------------------------- YAML files


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError, match=r"invalid YAML in .*bad\.yaml:3:2:"):
        load_yaml(bad)
    top_list = tmp_path / "list.yaml"
    top_list.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(top_list)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}


def test_compose_deep_merges_and_replaces_changed_components():
    base = {
        "algo": {"lr": 1.0, "clip": 0.2},
        "reward": {"_component_": "a.A", "scale": 2, "model": "x"},
        "opt": {"_component_": "torch.optim.AdamW", "lr": 1.0, "eps": 1e-8},
        "seeds": [0, 1],
    }
    exp = {
        "algo": {"lr": 2.0},
        "reward": {"_component_": "b.B", "temperature": 3},
        "opt": {"_component_": "torch.optim.AdamW", "lr": 3.0},
        "seeds": [5],
    }
    out = compose(base, exp)
    assert out == {
        "algo": {"lr": 2.0, "clip": 0.2},
        "reward": {"_component_": "b.B", "temperature": 3},  # old kwargs do not leak into the new target
        "opt": {"_component_": "torch.optim.AdamW", "lr": 3.0, "eps": 1e-8},
        "seeds": [5],
    }
    assert base["algo"]["lr"] == 1.0  # inputs untouched


def test_apply_overrides_set_add_delete():
    d = {"algo": {"lr": 1.0, "betas": [0.9, 0.99]}, "name": "a", "rewards": [{"w": 1}], "log": {"wandb": True}}
    out = apply_overrides(
        d,
        ["algo.lr=3e-4", "algo.betas=[0.5, 0.6]", "name=foo", "+algo.new.deep=7", "~log.wandb", "rewards.0.w=2"],
    )
    assert out == {
        "algo": {"lr": 3e-4, "betas": [0.5, 0.6], "new": {"deep": 7}},  # YAML 1.2: a float without a dot
        "name": "foo",
        "rewards": [{"w": 2}],
        "log": {},
    }
    assert d["name"] == "a"
    assert from_dict(AlgoConfig, {"lr": out["algo"]["lr"]}).lr == 3e-4
    assert apply_overrides({"x": 1}, ["x=null", "+y=true"]) == {"x": None, "y": True}


def test_override_values_follow_yaml_1_2_not_1_1():
    # untyped nodes (a _component_'s kwargs) get the parsed value as is, so 1.1's surprises would reach them
    d = {"critic": {"_component_": "x.Y", "eta": 0.7}, "run": {"mixed_precision": "bf16", "seed": 0, "t": "a"}}
    out = apply_overrides(d, ["critic.eta=7e-1", "run.mixed_precision=no", "run.seed=010", "run.t=1:30"])
    assert out["critic"]["eta"] == 0.7 and isinstance(out["critic"]["eta"], float)
    assert out["run"]["mixed_precision"] == "no"  # 1.1: False
    assert out["run"]["seed"] == "010"  # 1.1: octal 8, silently; a typed int field then refuses the string
    assert out["run"]["t"] == "1:30"  # 1.1: 90
    on_off = apply_overrides({"a": 0, "b": 0, "c": 0}, ["a=on", "b=True", "c=-1.5e3"])
    assert on_off == {"a": "on", "b": True, "c": -1500.0}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("algo.lrr=3", "key 'algo.lrr' does not exist — did you mean 'algo.lr'? (prefix with + to add a new key)"),
        ("alg.lr=3", "key 'alg' does not exist — did you mean 'algo'?"),
        ("~algo.lrr", "key 'algo.lrr' does not exist — did you mean 'algo.lr'?"),
        ("+algo.lr=3", "key 'algo.lr' already exists; drop the + to override it"),
        ("algo.lr", "must look like key=value"),
        ("algo.lr.x=1", "'algo.lr' is a float, not a mapping"),
        ("rewards.3.w=1", "'rewards.3' is not an index of a list of 1"),
    ],
)
def test_apply_overrides_errors(override, expected):
    with pytest.raises(ConfigError) as e:
        apply_overrides({"algo": {"lr": 1.0}, "rewards": [{"w": 1}]}, [override])
    assert expected in str(e.value)
    assert str(e.value).startswith(f"override '{override}'")


def test_yaml_to_object_pipeline(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "max_steps: 3\nalgo:\n  lr: 1.0e-3\nreward:\n  _component_: fractions.Fraction\n  numerator: 1\n"
    )
    (tmp_path / "exp.yaml").write_text("algo:\n  num_epochs: 2\n")
    d = compose(load_yaml(tmp_path / "base.yaml"), load_yaml(tmp_path / "exp.yaml"))
    d = apply_overrides(d, ["reward.numerator=3", "+reward.denominator=4"])
    cfg = from_dict(TrainConfig, d)
    assert (cfg.max_steps, cfg.algo.lr, cfg.algo.num_epochs) == (3, 1e-3, 2)
    assert instantiate(cfg.reward, _path="reward") == fractions.Fraction(3, 4)


def test_loading_reports_a_file_error_as_a_config_error_naming_the_node():
    from safetensors import SafetensorError

    from rl.config import loading

    cases = [(OSError("Unable to load weights from checkpoint file x\nmore"), "model: OSError: Unable to load weights"),
             (SafetensorError("header too large"), "reward: SafetensorError: header too large"),
             (KeyError("shift"), "model: KeyError: 'shift'"),
             (ValueError("unrecognized seed string"), "prompts.train: unrecognized seed string (check")]
    for error, message in cases:
        what = message.split(":")[0]
        with pytest.raises(ConfigError) as e:
            with loading(what):
                raise error
        assert str(e.value).startswith(message) and "more" not in str(e.value)  # the first line only
        assert e.value.__cause__ is error
    for error in (ConfigError("as is"), FileNotFoundError("no critic at x")):  # already say what to fix
        with pytest.raises(type(error)) as e:
            with loading("model"):
                raise error
        assert e.value is error
