"""DiffusionNFT: the loss and the re-anchored path against hand-derived values; smoke runs through rl/train.py;
resume reproduces an uninterrupted run."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl import nft, train
from rl.advantages import group_normalize, optimality_probability

TINY = str(Path(__file__).with_name("tiny.yaml"))


def test_reanchored_path_at_sigma_tau_zero_is_rectified_flow():
    z0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.2, 0.5, 0.9])
    path = nft.reanchored_path(z0, torch.zeros(3), t, eps)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(path.z_t, (1 - tt) * z0 + tt * eps)
    torch.testing.assert_close(path.target, eps - z0)


def test_reanchored_target_is_time_derivative_and_marginal_is_preserved():
    z_tau, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    s = torch.tensor([0.3, 0.55], dtype=torch.float64)
    t, h = torch.tensor([0.6, 0.8], dtype=torch.float64), 1e-6
    path = nft.reanchored_path(z_tau, s, t, eps)
    fd = (nft.reanchored_path(z_tau, s, t + h, eps).z_t - nft.reanchored_path(z_tau, s, t - h, eps).z_t) / (2 * h)
    torch.testing.assert_close(path.target.double(), fd, rtol=1e-5, atol=1e-6)
    # z_tau = (1 - s) x0 + s e1 re-noised to t must be distributed as (1 - t) x0 + t e: mean and std per x0
    x0 = torch.tensor(1.5, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    z_tau = (1 - 0.3) * x0 + 0.3 * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    z_t = nft.reanchored_path(z_tau, torch.full((n,), 0.3, dtype=torch.float64), torch.full((n,), 0.7, dtype=torch.float64),
                              torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)).z_t
    assert z_t.mean().item() == pytest.approx(0.3 * 1.5, abs=5e-3)
    assert z_t.std().item() == pytest.approx(0.7, abs=5e-3)
    with pytest.raises(ValueError, match="t > sigma_tau"):
        nft.reanchored_path(z_tau[:1], torch.tensor([0.5]), torch.tensor([0.5]), z_tau[:1])


def test_nft_loss_hand_derived():
    # one element per sample: v_theta = 2, v_old = 1, u = 0, beta = 0.5
    v_theta, v_old, u = torch.full((2, 1), 2.0), torch.ones(2, 1), torch.zeros(2, 1)
    r = torch.tensor([1.0, 0.25])
    # v+ = 0.5*1 + 0.5*2 = 1.5 -> 2.25 ; v- = 1.5*1 - 0.5*2 = 0.5 -> 0.25
    # sample 1: 2.25 ; sample 2: 0.25*2.25 + 0.75*0.25 = 0.75 ; mean 1.5
    out = nft.nft_loss(v_theta, v_old, u, r, nft_beta=0.5, v_ref=torch.zeros(2, 1), kl_beta=0.1)
    assert out.policy_loss.item() == pytest.approx(1.5)
    assert out.kl.item() == pytest.approx(4.0)
    assert out.loss.item() == pytest.approx(1.5 + 0.4)
    # gradient direction: r = 1 pulls v+ (hence v_theta) toward u
    v = torch.full((1, 1), 2.0, requires_grad=True)
    nft.nft_loss(v, torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1), 0.5).loss.backward()
    assert v.grad.item() == pytest.approx(2 * 1.5 * 0.5)


def test_group_advantages_and_optimality_probability():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    stats = group_normalize(rewards, 3)
    torch.testing.assert_close(stats.adv.view(2, 3).sum(1), torch.zeros(2), atol=1e-6, rtol=0)
    assert stats.adv[3:].abs().max() == 0  # constant group: no signal
    r = optimality_probability(torch.tensor([-100.0, -5.0, 0.0, 2.5, 5.0, 100.0]), clip=5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_normalize(rewards, 1)


def test_old_decay_ramps_and_caps():
    cfg = nft.NFTConfig(old_decay_ramp=0.1, old_decay_max=0.25)
    assert [nft.old_decay(cfg, e) for e in (0, 1, 2, 5)] == pytest.approx([0.0, 0.1, 0.2, 0.25])


def _run(tmp_path, name, critic="terminal", *overrides):
    out = tmp_path / name
    rc = train.main(["--algo", "nft", "--critic", critic, "--config", TINY, f"run.output_dir={out}", *overrides])
    assert rc == 0
    return out


def test_run_sets_the_float32_matmul_precision(tmp_path, monkeypatch):
    seen = []  # torch's setting is process-wide: record the call instead of leaving TF32 on for later tests
    monkeypatch.setattr(torch, "set_float32_matmul_precision", seen.append)
    _run(tmp_path, "tf32", "terminal", "run.matmul_precision=high", "run.max_epochs=1", "run.export_lora=false")
    assert seen == ["high"]


def test_cuda_graphs_on_a_cpu_run_is_a_config_error(tmp_path, capsys):
    out = tmp_path / "graphs"
    rc = train.main(["--algo", "nft", "--critic", "terminal", "--config", TINY, f"run.output_dir={out}",
                     "run.cuda_graphs=true", "run.max_epochs=1"])
    assert rc == 2
    assert "run.cuda_graphs replays CUDA graphs, but this run is on cpu: set run.cuda_graphs=false" in \
        capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("critic", ["terminal", "tweedie"])
def test_smoke_run_moves_lora_only_and_exports(tmp_path, critic, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from policies.testing import tiny_policy
    from rl import common

    runs, setup = [], common.setup_lora
    monkeypatch.setattr(common, "setup_lora", lambda run, *a, **k: runs.append(run) or setup(run, *a, **k))
    out = _run(tmp_path, critic, critic)
    # the trained transformer itself: every base weight is the pretrained one, only LoRA tensors moved
    pretrained = tiny_policy().transformer.state_dict()
    trained = {k.replace(".base_layer.", "."): v for k, v in runs[0].policy.transformer.state_dict().items()
               if "lora_" not in k}
    assert trained.keys() == pretrained.keys()
    for k, v in pretrained.items():
        torch.testing.assert_close(trained[k].cpu(), v, rtol=0, atol=0)
    lora_sd = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    b_weights = [v for k, v in lora_sd.items() if "lora_B" in k]
    assert b_weights and max(v.abs().max().item() for v in b_weights) > 0  # B starts at 0: it moved
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/policy" in x for x in lines) and any("eval/score" in x for x in lines)
    # base weights untouched: a fresh pipeline + the exported LoRA equals our own policy's samples with it
    pipe_policy = tiny_policy()
    base = {k: v.clone() for k, v in pipe_policy.transformer.state_dict().items()}
    pipe = StableDiffusion3Pipeline(transformer=pipe_policy.transformer, vae=pipe_policy.vae,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.load_lora_weights(out / "lora")
    with torch.no_grad():
        cond = pipe_policy.encode_prompts(["a red circle"])
        imgs = pipe(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled, guidance_scale=1.0,
                    latents=pipe_policy.noise(1, torch.Generator().manual_seed(0)), num_inference_steps=3,
                    height=16, width=16, output_type="pt").images
        pipe.transformer.disable_lora()
        base_imgs = pipe(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled, guidance_scale=1.0,
                         latents=pipe_policy.noise(1, torch.Generator().manual_seed(0)), num_inference_steps=3,
                         height=16, width=16, output_type="pt").images
    assert not torch.allclose(imgs, base_imgs)
    state = pipe_policy.transformer.state_dict()
    for k, v in base.items():  # the base layers inside the LoRA wrappers are the untouched originals
        key = k if k in state else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        torch.testing.assert_close(state[key], v, rtol=0, atol=0)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = _run(tmp_path, "full", "terminal", "run.max_epochs=3", "run.eval_every=0")
    part = _run(tmp_path, "part", "terminal", "run.max_epochs=2", "run.eval_every=0")
    rc = train.main(["--algo", "nft", "--critic", "terminal", "--config", TINY, f"run.output_dir={part}",
                     "run.max_epochs=3", "run.eval_every=0", "--resume", "latest"])
    assert rc == 0
    a = load_file(full / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(part / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)

    def losses(run_dir):
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss/policy"] for r in rows if "loss/policy" in r}

    assert losses(full)[3] == losses(part)[3]
    # resuming the finished run trains nothing and finishes at the epoch it was at, not one past it
    rc = train.main(["--algo", "nft", "--critic", "terminal", "--config", TINY, f"run.output_dir={part}",
                     "run.max_epochs=3", "run.eval_every=0", "--resume", "latest"])
    assert rc == 0
    last = json.loads((part / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and "eval/score" in last


def test_config_errors_exit_2(tmp_path, capsys):
    assert train.main(["--algo", "nfx", "--config", TINY]) == 2
    assert "valid choices" in capsys.readouterr().err
    assert train.main(["--critic", "terminal", "--config", TINY, "algo.group_size=1"]) == 2
    assert "group_size" in capsys.readouterr().err
    assert train.main(["--critic", "terminal", "--config", TINY, "algo.lr=-1"]) == 2
    assert "lr" in capsys.readouterr().err
    assert train.main(["--critic", "terminal", "--config", TINY, "algo.group_noise=true", "algo.group_size=4",
                       "algo.train_batch_size=6"]) == 2
    assert "a multiple of group_size (4)" in capsys.readouterr().err


def test_input_errors_exit_2_and_write_nothing(tmp_path, capsys):
    base = ["--critic", "terminal", "--config", TINY]
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert train.main([*base, f"run.output_dir={afile}"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err and afile.read_text() == "keep me"
    for key, what in [("prompts.train.n=0", "prompts.train gave no prompts"),
                      ("prompts.eval.n=0", "prompts.eval gave no prompts")]:
        out = tmp_path / key.split(".")[1]
        assert train.main([*base, key, f"run.output_dir={out}"]) == 2
        assert what in capsys.readouterr().err
        assert not out.exists() or not any(out.iterdir())  # no run files: the same command fixed starts cleanly
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert train.main([*base, "--config", str(empty)]) == 2
    assert "sets nothing" in capsys.readouterr().err


def test_a_prompt_the_reward_cannot_read_is_an_error_before_writing(tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_text("a red circle\na purple hexagon\n")  # "purple" and "hexagon" are not Shapes words
    out = tmp_path / "run"
    rc = train.main(["--critic", "terminal", f"run.output_dir={out}", "run.max_epochs=1",
                     f"prompts.train={{_component_: rl.prompts.from_file, path: {bad}}}"])
    assert rc == 2
    assert "error: prompts.train: prompt 'a purple hexagon' has words outside the Shapes vocabulary" in \
        capsys.readouterr().err
    assert not out.exists()


def test_damaged_weights_and_launch_mistakes_exit_2_before_writing(tmp_path, capsys, monkeypatch):
    import shutil

    weights = tmp_path / "w"
    shutil.copytree(Path(__file__).resolve().parents[2] / "shapes" / "weights", weights,
                    ignore=shutil.ignore_patterns("stitchvm*", "vae_stitch*"))
    vae = next((weights / "vae").glob("*.safetensors"))
    vae.write_bytes(b"\x00" * vae.stat().st_size)  # same size, garbage
    out = tmp_path / "run"
    base = ["--critic", "terminal", "--config", TINY, f"run.output_dir={out}"]
    node = f"model={{_component_: shapes.models.load_shapes_policy, weights_dir: {weights}}}"
    assert train.main([*base, node]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model: ") and "Traceback" not in err, err
    assert train.main([*base, "run.mixed_precision=fp16"]) == 2
    assert "run.mixed_precision=fp16 needs a GPU" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # a 2-GPU launch config on this CPU: two processes, no group
    assert train.main(base) == 2
    assert "2 processes were launched, but they did not form one group" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_resume_of_a_damaged_checkpoint_exits_2_and_keeps_the_metrics(tmp_path, capsys):
    out = _run(tmp_path, "damaged", "terminal", "run.export_lora=false")
    metrics_before = (out / "metrics.jsonl").read_text()
    lora = out / "checkpoints" / "step_00000002" / "lora_default.safetensors"
    lora.write_bytes(lora.read_bytes()[:300])
    capsys.readouterr()
    args = ["--critic", "terminal", "--config", TINY, f"run.output_dir={out}", "run.max_epochs=3"]
    assert train.main([*args, "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume latest: ") and "has 300 bytes, the manifest says" in err
    assert "step_00000001" in err  # the previous good checkpoint is named
    assert (out / "metrics.jsonl").read_text() == metrics_before


def test_evaluate_cli_refuses_a_damaged_or_foreign_lora_file(tmp_path, capsys):
    from safetensors.torch import save_file

    from rl import evaluate

    good = _run(tmp_path, "good", "terminal") / "lora" / "pytorch_lora_weights.safetensors"
    cases = {"garbage": b"\x00" * 64 + b"not safetensors", "truncated": good.read_bytes()[:200], "foreign": None}
    capsys.readouterr()
    for name, data in cases.items():
        export = tmp_path / name
        export.mkdir()
        if data is None:
            save_file({"w": torch.zeros(2)}, str(export / "pytorch_lora_weights.safetensors"))
        else:
            (export / "pytorch_lora_weights.safetensors").write_bytes(data)
        assert evaluate.main(["--lora", str(export), "--config", TINY]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, name
        assert ("holds no LoRA weights" if data is None else "not a readable safetensors file") in err, name
    assert evaluate.main(["--lora", str(good), "--config", TINY]) == 2  # the file instead of its directory
    assert "takes the export directory" in capsys.readouterr().err
    # the run's --critic, so that its config's critic keys (critic.path) fit; the evaluation uses no critic
    assert evaluate.main(["--config", TINY, "--critic", "stitchvm", "critic.path=nowhere", "prompts.eval.n=2"]) == 0
    assert "eval/score" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")  # the other model's LoRA
def test_evaluate_cli_scores_export_checkpoint_and_base(tmp_path, capsys):
    from rl import evaluate

    out = _run(tmp_path, "ev", "terminal")
    capsys.readouterr()  # the training run's own output
    common = ["--config", TINY]
    assert evaluate.main(["--lora", str(out / "lora"), *common]) == 0
    lora_scores = json.loads(capsys.readouterr().out)
    assert evaluate.main(["--checkpoint", str(out), *common]) == 0
    ckpt_scores = json.loads(capsys.readouterr().out)
    assert evaluate.main(["eval.batch_size=3", *common]) == 0  # an override before the flags, as rl/train.py takes
    base_scores = json.loads(capsys.readouterr().out)
    # the exported LoRA and the final checkpoint are the same policy; the base differs
    assert lora_scores["eval/score"] == pytest.approx(ckpt_scores["eval/score"], abs=1e-6)
    final = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert lora_scores["eval/score"] == pytest.approx(final["eval/score"], abs=1e-6)
    assert set(base_scores) == set(lora_scores)
    assert evaluate.main(["--lora", str(tmp_path / "nope"), *common]) == 2
    capsys.readouterr()
    assert evaluate.main([*common, "eval_metric=null"]) == 2
    assert "eval_metric: null" in capsys.readouterr().err
    assert evaluate.main([*common, "prompts.eval=null"]) == 2
    assert "prompts.eval: no evaluation prompts" in capsys.readouterr().err
    assert evaluate.main(["--lora", str(out / "lora")]) == 2  # the tiny run's LoRA on the Shapes world's model
    assert "not a LoRA of this model" in capsys.readouterr().err
    assert evaluate.main([*common, "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    # the other trainers' experiment configs compose with --algo (their algo keys are not NFT's)
    grpo_yaml = str(Path(__file__).resolve().parents[2] / "configs" / "experiments" / "shapes_gpu_grpo.yaml")
    assert evaluate.main(["--config", grpo_yaml, "--checkpoint", str(tmp_path / "no")]) == 2
    assert "is not a setting of --algo nft" in capsys.readouterr().err  # NFT has no eta, sde_window, ...
    assert evaluate.main(["--algo", "grpo", "--config", grpo_yaml, "--checkpoint", str(tmp_path / "no")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err  # composed; only the path is wrong


def test_every_group_is_valued_at_one_tau():
    from rl.config import ConfigError
    from rl.nft import NFTConfig

    with pytest.raises(ConfigError, match="rollout_batch_size"):
        NFTConfig(group_size=24, rollout_batch_size=16)  # a group would straddle two rounds with different tau
    NFTConfig(group_size=24, rollout_batch_size=8)  # a group spans three whole rounds: they share its tau
    NFTConfig(group_size=8, rollout_batch_size=64)  # a round holds eight whole groups


def test_group_noise_keeps_groups_together_and_shares_draws():
    g = torch.Generator().manual_seed(0)
    perm = nft.group_permutation(24, 4, g)
    assert sorted(perm.tolist()) == list(range(24))
    blocks = perm.view(6, 4)
    assert ((blocks - blocks[:, :1]) == torch.arange(4)).all()  # each block is one whole group, in order
    assert (blocks[:, 0] % 4 == 0).all()
    idx = torch.tensor([9, 3, 8, 1, 11, 0])  # groups of 4: 2, 0, 2, 0, 2, 0
    src = nft.first_of_group(idx, 4)
    assert src.tolist() == [0, 1, 0, 1, 0, 1]
    draws = torch.randn(6, 3, generator=g)[src]
    assert torch.equal(draws[0], draws[2]) and torch.equal(draws[0], draws[4]) and torch.equal(draws[1], draws[5])
    assert not torch.equal(draws[0], draws[1])


def test_group_noise_run_is_deterministic_and_changes_the_update(tmp_path):
    def lora_of(name, *extra):
        out = _run(tmp_path, name, "terminal", "run.max_epochs=1", "run.eval_every=0", *extra)
        return load_file(out / "lora" / "pytorch_lora_weights.safetensors")

    a, b = lora_of("crn_a", "algo.group_noise=true"), lora_of("crn_b", "algo.group_noise=true")
    c = lora_of("plain", "algo.group_noise=false")
    assert all(torch.equal(a[k], b[k]) for k in a)            # same seed, same draws
    assert any(not torch.equal(a[k], c[k]) for k in a)        # shared (t, eps) is a different estimate


def test_evaluations_do_not_change_training(tmp_path):
    """The README's CPU figure was measured with run.eval_every=0: the periodic evaluations must not touch the
    training random streams, so the default job (evaluating every 25 epochs) trains the same LoRA."""
    a = _run(tmp_path, "evals", "terminal", "run.max_epochs=2", "run.eval_every=1")
    b = _run(tmp_path, "no_evals", "terminal", "run.max_epochs=2", "run.eval_every=0")
    la = load_file(a / "lora" / "pytorch_lora_weights.safetensors")
    lb = load_file(b / "lora" / "pytorch_lora_weights.safetensors")
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_training_timesteps_are_uniform_over_each_rows_own_sigmas():
    # an epoch whose rounds stopped at tau 3 and 5: the tau-3 row's columns are padded by repeats to k = 5, and it
    # must draw distinct columns among its own 3 (repeats would double-weight its highest-noise sigmas)
    g = torch.Generator().manual_seed(0)
    num_sigmas = torch.tensor([3, 5])
    counts = torch.zeros(2, 5)
    for _ in range(3000):
        cols = nft.draw_columns(num_sigmas, 5, 2, g)
        assert cols.shape == (2, 2) and (cols[:, 0] != cols[:, 1]).all()
        counts[0].index_add_(0, cols[0], torch.ones(2))
        counts[1].index_add_(0, cols[1], torch.ones(2))
    assert counts[0, 3:].sum() == 0  # never the padding
    freq0, freq1 = counts[0, :3] / counts[0].sum(), counts[1] / counts[1].sum()
    torch.testing.assert_close(freq0, torch.full((3,), 1 / 3), rtol=0, atol=0.03)
    torch.testing.assert_close(freq1, torch.full((5,), 1 / 5), rtol=0, atol=0.03)
    # one tau for every row: the draws are those of a randperm per row, as before rounds could differ
    a = nft.draw_columns(torch.tensor([4, 4]), 4, 3, torch.Generator().manual_seed(1))
    g1 = torch.Generator().manual_seed(1)
    b = torch.stack([torch.randperm(4, generator=g1)[:3] for _ in range(2)])
    assert torch.equal(a, b)


def test_a_new_run_into_a_finished_runs_directory_is_refused_or_replaces_it(tmp_path, capsys):
    out = _run(tmp_path, "first", "terminal", "run.max_epochs=1", "run.eval_every=0")
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    rc = train.main(["--critic", "terminal", "--config", TINY, f"run.output_dir={out}", "run.max_epochs=1"])
    assert rc == 2 and "holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched
    rc = train.main(["--critic", "terminal", "--config", TINY, f"run.output_dir={out}", "run.max_epochs=2",
                     "run.eval_every=0", "run.overwrite=true"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/policy" in r] == [1, 2]  # the new run's epochs only
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))[-1].endswith("2")


def test_resume_from_an_earlier_checkpoint_logs_each_epoch_once(tmp_path):
    # epochs logged after the checkpoint that is resumed are trained again: their old rows go, and wall_time goes on
    out = _run(tmp_path, "run", "terminal", "run.max_epochs=3", "run.eval_every=0", "run.ckpt_every=2",
               "run.keep_checkpoints=5")
    step2 = next(p for p in (out / "checkpoints").iterdir() if p.name.endswith("00002"))
    rc = train.main(["--algo", "nft", "--critic", "terminal", "--config", TINY, f"run.output_dir={out}",
                     "run.max_epochs=3", "run.eval_every=0", "--resume", str(step2)])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss/policy" in r]
    assert train_steps == [1, 2, 3]
    times = [r["wall_time"] for r in rows]
    assert times == sorted(times)
