"""rl/steer.py: every configs/steer/*.yaml loads into SteerConfig; the CLI runs each method on the tiny world and
fails with status 2 and a clear message for bad keys or a missing critic."""

import json
from pathlib import Path

import pytest

from rl import steer
from rl.config import ConfigError


@pytest.mark.parametrize("method", steer.METHODS)
def test_every_steer_config_loads(method):
    assert (steer.CONFIG_ROOT / f"{method}.yaml").is_file()
    cfg = steer.load_config(method, [], [])
    assert isinstance(cfg, steer.SteerConfig)
    if method == "fk":
        assert (cfg.fk.num_particles, cfg.fk.num_proposals) == (4, 2)


def test_overrides_and_unknown_keys():
    cfg = steer.load_config("dps", [], ["dps.guidance_scale=0.25", "num_steps=7"])
    assert (cfg.dps.guidance_scale, cfg.num_steps) == (0.25, 7)
    with pytest.raises(ConfigError, match="guidance_scale"):
        steer.load_config("dps", [], ["+dps.guidance_scal=1"])


@pytest.mark.parametrize("method,critic", [("none", "stitchvm"), ("dps", "stitchvm"), ("fk", "tweedie")])
def test_cli_smoke_on_tiny_world(tmp_path, capsys, method, critic):
    out = tmp_path / method
    rc = steer.main(["--world", "tiny", "--method", method, "--critic", critic, "--n", "3", "--out", str(out),
                     "--device", "cpu", "batch_size=2", "num_steps=3", "fk.num_particles=2"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"shapes_eval/overall", "reward/mean", "time/seconds_per_sample"} <= set(metrics)
    assert (out / "grid.png").stat().st_size > 0
    assert "seconds_per_sample" in capsys.readouterr().out


def test_grid_images_zero_writes_no_grid_and_negative_is_refused(tmp_path):
    out = tmp_path / "g"
    # one prompt without a relation ("--prompt-seed 2"), overrides before the flags as rl/train.py accepts them
    assert steer.main(["batch_size=1", "num_steps=2", "grid_images=0", "--world", "tiny", "--method", "none", "--n",
                       "1", "--prompt-seed", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert not (out / "grid.png").exists()

    def strict(constant):
        raise ValueError(f"metrics.json holds {constant}, which strict JSON lacks")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=strict)["metrics"]
    assert "shapes_eval/overall" in metrics and "shapes_eval/position" not in metrics  # no relation prompt
    with pytest.raises(ConfigError, match="grid_images: must be >= 0"):
        steer.load_config("none", [], ["grid_images=-1"])


def test_cli_missing_stitchvm_is_a_clear_error(tmp_path, capsys):
    cfg = steer.load_config("dps", [], [f"stitchvm_path={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match=f"no critic at {tmp_path / 'nowhere'}"):
        steer.build_world("shapes", "stitchvm", cfg, __import__("torch").device("cpu"))
    rc = steer.main(["--method", "dps", "--critic", "stitchvm", "--n", "2", "--device", "cpu",
                     f"stitchvm_path={tmp_path / 'nowhere'}"])
    assert rc == 2
    assert f"error: no critic at {tmp_path / 'nowhere'}" in capsys.readouterr().err


@pytest.mark.parametrize("method,critic,value,message", [
    ("dps", "stitchvm", "bogus", "must be null"),
    ("dps", "tweedie", "tail", "shared-head guide only"),
    ("none", "stitchvm", "full", "drop cuda_graph"),
    ("dps", "stitchvm", "full", "needs a CUDA device"),  # the CPU here; on a GPU this is the fast path
])
def test_cli_cuda_graph_errors_exit_2_before_writing(tmp_path, capsys, method, critic, value, message):
    out = tmp_path / "out"
    rc = steer.main(["--world", "tiny", "--method", method, "--critic", critic, "--n", "2", "--out", str(out),
                     "--device", "cpu", f"cuda_graph={value}"])
    assert rc == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_dps_with_a_critic_without_gradient_exits_2_before_writing(tmp_path, capsys):
    out = tmp_path / "out"
    rc = steer.main(["--world", "tiny", "--method", "dps", "--critic", "mc", "--n", "2", "--out", str(out),
                     "--device", "cpu", "num_steps=3"])
    assert rc == 2 and "critic 'mc' has none" in capsys.readouterr().err
    assert not out.exists()


def test_cli_input_errors_exit_2_and_touch_nothing(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    base = ["--world", "tiny", "--n", "2", "--device", "cpu", "num_steps=2"]
    assert steer.main([*base, "--method", "none", "--out", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "keep me"
    weights = Path(__file__).resolve().parents[3] / "shapes" / "weights"
    rc = steer.main([*base, "--method", "dps", "--out", str(tmp_path / "o"), f"stitchvm_path={weights / 'stitchvm'}"])
    assert rc == 2
    assert "the tiny world's StitchVM is a random one" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # a saved critic of the other kind is named as such, not as an incomplete StitchVM
    rc = steer.main(["--method", "dps", "--critic", "stitchvm", "--n", "2", "--device", "cpu",
                     f"stitchvm_path={weights / 'vae_stitch'}", "--out", str(tmp_path / "p")])
    assert rc == 2 and "holds a vae_stitch critic (vae_stitch.json), not a stitchvm one" in capsys.readouterr().err


def test_cli_device_errors_exit_2(tmp_path, capsys):
    import torch

    base = ["--world", "tiny", "--method", "none", "--n", "2", "--out", str(tmp_path / "o"), "num_steps=2"]
    assert steer.main([*base, "--device", "gpu0"]) == 2
    assert "'gpu0' is not a device name" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert steer.main([*base, "--device", "cuda"]) == 2
        assert "this machine has no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fk_batches_draw_their_own_resampling(tmp_path, monkeypatch):
    from rl.steering import fk

    seeds, sample = [], fk.fk_sample

    def spy(guide, z_T, sigmas, cond, prompts, cfg, generator=None):
        seeds.append(cfg.seed)
        return sample(guide, z_T, sigmas, cond, prompts, cfg, generator)

    monkeypatch.setattr(fk, "fk_sample", spy)
    rc = steer.main(["--world", "tiny", "--method", "fk", "--critic", "tweedie", "--n", "3", "--out",
                     str(tmp_path / "out"), "--device", "cpu", "batch_size=2", "num_steps=3", "fk.num_particles=2",
                     "fk.seed=7"])
    assert rc == 0 and seeds == [7, 7, 8]  # the untimed warm-up, then batches 0 and 1
