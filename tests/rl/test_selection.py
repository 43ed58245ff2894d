"""run.keep_best (rl/selection.py): the run finishes with the adapter that scored best on prompts.val.

A planted metric scores the validation prompts from a fixed schedule, so the best epoch is known; the final
held-out evaluation (fixed noise, CPU-deterministic) must then equal that epoch's evaluation exactly."""

import json

import pytest
import torch

from rl import train
from tests.rl.test_grpo import DROP, TINY, lora_moved, metrics

VAL = {"_component_": "shapes.data.prompts", "split": "test", "n": 4, "seed": 2}
SCHEDULE: list[float] = []  # validation scores, consumed one per validation call


class PlantedMetric:
    """'overall': the planted schedule on validation prompts, the mean pixel of each image on the others."""

    def __init__(self):
        from shapes.data import prompts

        self.val = set(prompts(VAL["split"], VAL["n"], VAL["seed"]))

    def __call__(self, images, prompts):
        if prompts[0] in self.val:
            return {"overall": torch.full((len(prompts),), SCHEDULE.pop(0))}
        return {"overall": images.float().mean(dim=(1, 2, 3))}


def config(tmp_path, **run):
    path = tmp_path / "select.yaml"
    path.write_text(json.dumps({"prompts": {"val": VAL}, "eval_metric": {"_component_": f"{__name__}.PlantedMetric"},
                                "run": {"keep_best": True, "keep_checkpoints": 5, **run}}))
    return str(path)


def main(tmp_path, algo, *overrides):
    drop = DROP.get(algo, [])
    return train.main(["--algo", algo, "--critic", "terminal", "--config", TINY, "--config", config(tmp_path), *drop,
                       f"run.output_dir={tmp_path / 'run'}", *overrides])


def evals(rows):
    """{epoch: eval/overall} of the periodic evaluations, and the final one (logged with best/epoch)."""
    periodic = {r["step"]: r["eval/overall"] for r in rows if "eval/overall" in r and "train/epoch" in r}
    final = [r for r in rows if "eval/overall" in r and "train/epoch" not in r]
    return periodic, final[-1]


@pytest.mark.parametrize("algo", ["nft", "grpo", "ddpo", "draft"])
def test_finishes_with_the_adapter_that_validated_best(tmp_path, algo):
    SCHEDULE[:] = [0.2, 0.9, 0.5, 0.4]  # start, epochs 1-3: epoch 1 is best
    reward = ["reward._component_=tests.rl.test_draft.Redness"] if algo == "draft" else []  # differentiable
    assert main(tmp_path, algo, "run.max_epochs=3", *reward) == 0
    assert SCHEDULE == []  # validated at the start and after every epoch
    rows = metrics(tmp_path / "run")
    periodic, final = evals(rows)
    assert final["best/epoch"] == 1 and final["best/val_overall"] == pytest.approx(0.9)
    assert final["eval/overall"] == periodic[1]  # the epoch-1 adapter, evaluated again
    assert final["eval/overall"] != periodic[3]
    assert [r["val/overall"] for r in rows if "val/overall" in r] == pytest.approx([0.2, 0.9, 0.5, 0.4])


def test_the_initial_policy_wins_when_training_never_beats_it(tmp_path):
    SCHEDULE[:] = [0.9, 0.1, 0.2]
    assert main(tmp_path, "grpo", "run.max_epochs=2") == 0
    periodic, final = evals(metrics(tmp_path / "run"))
    assert final["best/epoch"] == 0 and final["eval/overall"] == periodic[0]
    assert not lora_moved(tmp_path / "run")  # the exported LoRA is the initial one (B = 0)


def test_resume_keeps_the_choice(tmp_path):
    SCHEDULE[:] = [0.2, 0.9, 0.5]
    assert main(tmp_path, "grpo", "run.max_epochs=2") == 0
    SCHEDULE[:] = [0.4]  # the resumed epoch 3 validates lower: the checkpoint's epoch-1 adapter stays the choice
    assert main(tmp_path, "grpo", "run.max_epochs=3", "--resume", "latest") == 0
    assert SCHEDULE == []
    periodic, final = evals(metrics(tmp_path / "run"))
    assert final["best/epoch"] == 1 and final["eval/overall"] == periodic[1]


def test_config_errors(tmp_path, capsys):
    base = ["--algo", "grpo", "--critic", "terminal", "--config", TINY, *DROP["grpo"],
            f"run.output_dir={tmp_path / 'run'}"]
    assert train.main([*base, "run.keep_best=true"]) == 2
    assert "set prompts.val" in capsys.readouterr().err
    assert train.main([*base, "--config", config(tmp_path), "run.eval_every=0"]) == 2
    assert "run.eval_every >= 1" in capsys.readouterr().err
    assert train.main([*base, "--config", config(tmp_path), "prompts.val.seed=1"]) == 2  # = the eval prompts
    assert "also an evaluation prompt" in capsys.readouterr().err
    SCHEDULE[:] = [0.5]
    assert train.main([*base, "--config", config(tmp_path), "run.best_metric=count"]) == 2  # before any update
    assert "best_metric='count' is not a score of the eval metric; it gives: overall" in capsys.readouterr().err


def test_epochs_after_the_last_evaluation_are_candidates(tmp_path):
    SCHEDULE[:] = [0.2, 0.5, 0.9]  # start, epoch 2 (eval_every 2), epoch 3 (validated at the end)
    assert main(tmp_path, "grpo", "run.max_epochs=3", "run.eval_every=2") == 0
    assert SCHEDULE == []
    rows = metrics(tmp_path / "run")
    periodic, final = evals(rows)
    assert final["best/epoch"] == 3 and sorted(periodic) == [0, 2] and final["eval/overall"] != periodic[2]


def test_resume_from_a_checkpoint_without_keep_best_validates_it_first(tmp_path, capsys):
    assert main(tmp_path, "grpo", "run.max_epochs=1", "run.keep_best=false") == 0  # no validation, no kept adapter
    SCHEDULE[:] = [0.7, 0.3]  # the restored epoch-1 adapter, then the final epoch 2 (eval_every 3: none between)
    assert main(tmp_path, "grpo", "run.max_epochs=2", "run.eval_every=3", "--resume", "latest") == 0
    assert SCHEDULE == []
    rows = metrics(tmp_path / "run")
    periodic, final = evals(rows)
    assert final["best/epoch"] == 1 and final["eval/overall"] == periodic[1]


def test_nan_validation_never_wins_and_all_nan_is_an_error(tmp_path):
    SCHEDULE[:] = [float("nan"), 0.3, float("nan")]
    assert main(tmp_path, "grpo", "run.max_epochs=2") == 0
    periodic, final = evals(metrics(tmp_path / "run"))
    assert final["best/epoch"] == 1 and final["eval/overall"] == periodic[1]
    SCHEDULE[:] = [float("nan")] * 2
    (tmp_path / "b").mkdir()
    with pytest.raises(RuntimeError, match="every validation score of 'overall' was NaN"):
        main(tmp_path / "b", "grpo", "run.max_epochs=1")


def test_evaluate_cli_uses_the_kept_adapter(tmp_path, capsys):
    from rl import evaluate

    SCHEDULE[:] = [0.2, 0.9, 0.5]
    assert main(tmp_path, "grpo", "run.max_epochs=2") == 0
    periodic, final = evals(metrics(tmp_path / "run"))
    args = ["--config", TINY, "--checkpoint", str(tmp_path / "run"), "eval_metric._component_="
            "critics.rewards.jpeg.JPEGCompressibility"]
    capsys.readouterr()
    outputs = {}
    for extra in ([], ["--last"]):
        assert evaluate.main([*args, *extra]) == 0
        out = capsys.readouterr()
        outputs[tuple(extra)] = json.loads(out.out)["eval/score"]
        assert ("kept by validation" in out.err) == (not extra)
    assert outputs[()] != outputs[("--last",)]  # the epoch-1 adapter vs the epoch-2 one
    assert evaluate.main(["--last", "--config", TINY]) == 2


@pytest.mark.parametrize("algo", ["nft", "grpo"])
def test_start_up_validation_is_not_charged_to_the_first_epoch(tmp_path, algo):
    # validation runs at epoch 0 (start-up) and every 2 epochs: epoch 1 evaluates nothing, so its row has no
    # time/eval (the start-up's used to land there)
    SCHEDULE[:] = [0.2, 0.3, 0.4, 0.5]
    assert main(tmp_path, algo, "run.max_epochs=2", "run.eval_every=2") == 0
    epoch1 = [r for r in metrics(tmp_path / "run") if r["step"] == 1 and "time/rollout" in r]
    assert len(epoch1) == 1 and "time/eval" not in epoch1[0]


@pytest.mark.parametrize("algo", ["nft", "grpo"])
@pytest.mark.parametrize("every,epochs,sampled", [(1, 2, [0, 1, 2]), (2, 3, [0, 2, "final"]), (0, 1, [0, "final"])])
def test_the_final_evaluation_reuses_the_loops_when_nothing_changed(tmp_path, monkeypatch, algo, every, epochs,
                                                                    sampled):
    # Without keep_best the final evaluation scores the adapter the loop has just scored at the same epoch (fixed
    # noise): it is not sampled again. After any other epoch it is.
    from rl import common

    calls, evaluate = [], common.evaluate
    monkeypatch.setattr(common, "evaluate", lambda run, *a, **k: calls.append(run) or evaluate(run, *a, **k))
    assert main(tmp_path, algo, f"run.max_epochs={epochs}", f"run.eval_every={every}", "run.keep_best=false") == 0
    assert len(calls) == len(sampled)
    periodic, final = evals(metrics(tmp_path / "run"))
    assert sorted(periodic) == [e for e in sampled if e != "final"]
    if "final" not in sampled:
        assert final["eval/overall"] == periodic[epochs]
