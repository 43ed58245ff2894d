"""Every run config in configs/ composes and validates through rl/train.py (models are not built: the real ones
need weights on disk); the Shapes defaults are instantiated by the smoke runs in test_nft.py."""

from pathlib import Path

import pytest

from rl import prompts, train

EXPERIMENTS = sorted((train.CONFIG_ROOT / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("critic", train.critic_choices())
@pytest.mark.parametrize("algo", sorted(train.ALGOS))
def test_every_algo_and_critic_config_composes(algo, critic):
    composed = train.compose_config(train.parse_args(["--algo", algo, "--critic", critic]))
    assert composed.raw["critic"]["_component_"]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_configs_compose(path):
    # shapes_gpu_grpo.yaml is for --algo grpo; a name without an algorithm suffix is DiffusionNFT's
    algo = next((a for a in train.ALGOS if path.stem.endswith(f"_{a}")), "nft")
    composed = train.compose_config(train.parse_args(["--algo", algo, "--critic", "stitchvm", "--config", str(path)]))
    if algo in ("nft", "draft"):  # the trainers with an early stop tau
        assert composed.algo_cfg.num_steps >= composed.algo_cfg.tau_max


def test_the_saved_config_holds_the_typed_values_the_run_uses():
    # config.yaml, the checkpoint's config and a resume's settings check read raw: it must say what ran
    composed = train.compose_config(train.parse_args(["--algo", "grpo", "--critic", "terminal", "run.max_minutes=10",
                                                      "algo.sde_window_start=[0, 2]"]))
    assert composed.raw["run"]["max_minutes"] == 10.0 and isinstance(composed.raw["run"]["max_minutes"], float)
    assert composed.raw["algo"]["sde_window_start"] == [0, 2] and composed.algo_cfg.sde_window_start == (0, 2)
    from rl.config import to_dict

    assert composed.raw["algo"] == to_dict(composed.algo_cfg)


def test_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \n")
    assert prompts.from_file(f) == ["a cat", "a dog"] and prompts.from_file(f, limit=1) == ["a cat"]
    with pytest.raises(FileNotFoundError, match="one prompt per line"):
        prompts.from_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        prompts.from_file(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"ab\xb4\xff")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        prompts.from_file(tmp_path / "bin.txt")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        prompts.from_file(tmp_path)
    for bad in (0, 2.5, -1, "3"):  # a slice would quietly keep none, all but one, or fail later
        with pytest.raises(ValueError, match="whole number >= 1"):
            prompts.from_file(f, limit=bad)


def test_another_trainers_experiment_config_names_that_trainer(capsys, tmp_path):
    grpo_yaml = str(train.CONFIG_ROOT / "experiments" / "sd35m_grpo.yaml")
    assert train.main(["--algo", "nft", "--critic", "stitchvm", "--config", grpo_yaml]) == 2
    err = capsys.readouterr().err
    assert "is not a setting of --algo nft but of --algo ddpo / grpo" in err and "it was written for" in err
    (tmp_path / "nft_only.yaml").write_text("algo: {nft_beta: 0.5}\n")
    assert train.main(["--algo", "grpo", "--critic", "terminal", "--config", str(tmp_path / "nft_only.yaml")]) == 2
    assert "algo.nft_beta is not a setting of --algo grpo but of --algo nft" in capsys.readouterr().err
    # keys that fit no trainer keep the look-alike suggestion
    (tmp_path / "typo.yaml").write_text("algo: {lrr: 0.1}\n")
    assert train.main(["--algo", "grpo", "--critic", "terminal", "--config", str(tmp_path / "typo.yaml")]) == 2
    assert "unknown key 'algo.lrr' — did you mean 'lr'?" in capsys.readouterr().err


def test_a_critic_argument_of_another_critic_says_how_to_drop_it(capsys):
    grpo_yaml = str(train.CONFIG_ROOT / "experiments" / "sd35m_grpo.yaml")
    assert train.main(["--algo", "grpo", "--critic", "terminal", "--config", grpo_yaml, "algo.advantages=sparse"]) == 2
    assert "drop it with '~critic.path'" in capsys.readouterr().err
