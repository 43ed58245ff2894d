"""rl.checkpoint (atomic, verified save/load; optimizer/RNG round trips) and rl.signals.GracefulExit."""

import copy
import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import rl.checkpoint
from rl.checkpoint import (
    CheckpointError,
    NonFiniteError,
    assert_finite,
    atomic_write_json,
    capture_rng,
    list_checkpoints,
    load_checkpoint,
    recover_resave,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
    scheduler_state_from_json,
    scheduler_state_to_json,
)
from rl.signals import GracefulExit


def _tensors(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "lora_current": {
            "a": torch.randn(4, 3, generator=g),
            "b": torch.randn(3, 5, generator=g).to(torch.bfloat16),
            "scalar": torch.tensor(2.5),
        },
        "ema": {"w": torch.randn(2, 2, generator=g).half(), "count": torch.arange(5)},
    }


# ---------------------------------------------------------------------------------------------- round trips


def test_atomic_write_json_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": [1, 2]})
    atomic_write_json(tmp_path / "x.json", {"a": [3]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [3]}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_save_load_round_trip_is_bit_exact(tmp_path):
    tensors = _tensors()
    state = {"config": {"lr": 1e-4, "betas": (0.9, 0.999)}, "metrics": {"reward/mean": 0.123456789}, "ids": {3: "x"}}
    path = save_checkpoint(tmp_path, 7, tensors, state)
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors",
        "lora_current.safetensors",
        "manifest.json",
        "state.json",
    ]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000007\n"

    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 7 and ckpt.path == path
    assert ckpt.tensors.keys() == tensors.keys()
    for group, group_tensors in tensors.items():
        assert ckpt.tensors[group].keys() == group_tensors.keys()
        for name, t in group_tensors.items():
            loaded = ckpt.tensors[group][name]
            assert loaded.dtype == t.dtype and loaded.shape == t.shape and torch.equal(loaded, t), (group, name)
    # tuples and int keys survive JSON
    assert ckpt.state["config"] == {"lr": 1e-4, "betas": (0.9, 0.999)}
    assert ckpt.state["ids"] == {3: "x"}
    assert ckpt.state["metrics"]["reward/mean"] == 0.123456789
    assert ckpt.state["step"] == 7 and set(ckpt.state["rng"]) == {"python", "numpy", "torch_cpu", "torch_cuda"}


def test_resolve_checkpoint_forms(tmp_path):
    save_checkpoint(tmp_path, 1, _tensors(), {})
    step2 = save_checkpoint(tmp_path, 2, _tensors(), {})
    for p in (tmp_path, tmp_path / "checkpoints", tmp_path / "latest", tmp_path / "checkpoints" / "latest", step2):
        assert resolve_checkpoint(p) == step2
    assert load_checkpoint(tmp_path / "checkpoints" / "step_00000001").step == 1
    with pytest.raises(CheckpointError, match="no checkpoint at .*nothing_here"):
        resolve_checkpoint(tmp_path / "nothing_here")


def _train_steps(model, opt, sched, n):
    for _ in range(n):
        x = torch.randn(8, 4)  # draws from the global RNG, so the RNG state matters for resuming
        loss = (model(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters(), "lr": 3e-3}],
        weight_decay=0.1,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    return model, opt, sched


def test_resume_equals_uninterrupted_adamw(tmp_path):
    model, opt, sched = _make()
    _train_steps(model, opt, sched, 3)
    saved_opt_state = copy.deepcopy(opt.state_dict())
    opt_tensors, opt_meta = optimizer_state_to_tensors(opt.state_dict())
    save_checkpoint(
        tmp_path,
        3,
        {"model": model.state_dict(), "optimizer": opt_tensors},
        {"optimizer": opt_meta, "scheduler": scheduler_state_to_json(sched.state_dict())},
    )
    _train_steps(model, opt, sched, 3)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)  # clobber the RNG: restore_rng must undo this
    resumed, opt2, sched2 = _make(seed=99)
    ckpt = load_checkpoint(tmp_path)
    resumed.load_state_dict(ckpt.tensors["model"])
    restored_opt_state = optimizer_state_from_tensors(ckpt.tensors["optimizer"], ckpt.state["optimizer"])
    opt2.load_state_dict(restored_opt_state)
    sched2.load_state_dict(scheduler_state_from_json(ckpt.state["scheduler"]))
    restore_rng(ckpt.state["rng"])

    # the optimizer state itself round-tripped exactly (param groups with tuples, step counters, moments)
    assert restored_opt_state["param_groups"] == saved_opt_state["param_groups"]
    assert restored_opt_state["state"].keys() == saved_opt_state["state"].keys() == {0, 1, 2, 3}
    for pid, param_state in saved_opt_state["state"].items():
        for name, value in param_state.items():
            assert torch.equal(restored_opt_state["state"][pid][name], value), (pid, name)
    assert float(restored_opt_state["state"][0]["step"]) == 3.0

    _train_steps(resumed, opt2, sched2, 3)
    for name, value in uninterrupted.items():
        assert torch.equal(resumed.state_dict()[name], value), name

    # sensitivity: resuming without the optimizer moments does not reproduce the run
    fresh, opt3, sched3 = _make(seed=99)
    fresh.load_state_dict(ckpt.tensors["model"])
    restore_rng(ckpt.state["rng"])
    _train_steps(fresh, opt3, sched3, 3)
    assert not torch.equal(fresh.state_dict()["0.weight"], uninterrupted["0.weight"])


def test_rng_restore_reproduces_draws():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's legacy state
    state = json.loads(json.dumps(capture_rng()))  # must survive JSON
    first = (random.random(), random.gauss(0, 1), np.random.randn(3), torch.rand(3), torch.randn(2))
    restore_rng(state)
    second = (random.random(), random.gauss(0, 1), np.random.randn(3), torch.rand(3), torch.randn(2))
    assert first[:2] == second[:2]
    np.testing.assert_array_equal(first[2], second[2])
    assert torch.equal(first[3], second[3]) and torch.equal(first[4], second[4])
    third = torch.rand(3)
    assert not torch.equal(third, first[3])


def test_restore_rng_refuses_cuda_device_count_mismatch():
    state = capture_rng()
    state["torch_cuda"] = ["AAAA"] * (torch.cuda.device_count() + 1)
    with pytest.raises(CheckpointError, match="RNG states for .* CUDA device"):
        restore_rng(state)
    restore_rng(state, cuda=False)


def test_scheduler_state_refuses_callables():
    with pytest.raises(CheckpointError, match="'fn' is a function"):
        scheduler_state_to_json({"fn": lambda step: 1.0})


# ---------------------------------------------------------------------------------------------- corruption


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_file_is_refused_and_previous_good_named(tmp_path):
    good = save_checkpoint(tmp_path, 1, _tensors(1), {})
    bad = save_checkpoint(tmp_path, 2, _tensors(2), {})
    target = bad / "lora_current.safetensors"
    _flip_byte(target, target.stat().st_size - 3)  # inside the tensor data, same size
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)  # never silently falls back to step 1
    msg = str(e.value)
    assert "lora_current.safetensors is corrupt: sha256" in msg
    assert f"the previous good checkpoint is {good}" in msg
    assert load_checkpoint(good).step == 1  # the explicit way out works


def test_truncated_and_missing_files_are_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, _tensors(), {})
    target = path / "ema.safetensors"
    size = target.stat().st_size
    target.write_bytes(target.read_bytes()[: size // 2])
    with pytest.raises(CheckpointError, match=rf"ema\.safetensors has {size // 2} bytes, the manifest says {size}"):
        load_checkpoint(path)
    assert "no earlier checkpoint of this run verifies" in _error(path)
    (path / "state.json").unlink()
    target.unlink()
    assert "ema.safetensors is missing" in _error(path)


def _error(path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    return str(e.value)


def test_killed_save_leaves_ignorable_temp_dir(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _tensors(1), {})
    save_checkpoint(tmp_path, 2, _tensors(2), {})
    real_write_json = rl.checkpoint.atomic_write_json

    def killed_at_manifest(path, obj):
        if path.name == "manifest.json":
            raise KeyboardInterrupt  # the process dies before the manifest exists
        real_write_json(path, obj)

    monkeypatch.setattr(rl.checkpoint, "atomic_write_json", killed_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, _tensors(3), {})
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    assert (root / "step_00000003.tmp" / "lora_current.safetensors").is_file()
    assert (root / "latest").read_text() == "step_00000002\n"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 2 and torch.equal(ckpt.tensors["lora_current"]["a"], _tensors(2)["lora_current"]["a"])

    # the next save succeeds and cleans the leftover
    save_checkpoint(tmp_path, 3, _tensors(3), {})
    assert not (root / "step_00000003.tmp").exists()
    assert load_checkpoint(tmp_path).step == 3


def test_keep_n_rotation_and_resave(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, _tensors(step), {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    # a run resumed from step 4 re-saves step 5: replaced, not rotated away
    save_checkpoint(tmp_path, 5, _tensors(50), {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert torch.equal(load_checkpoint(tmp_path).tensors["ema"]["w"], _tensors(50)["ema"]["w"])
    # a checkpoint of a later step (abandoned timeline) is not deleted by an earlier step's save
    save_checkpoint(tmp_path, 3, _tensors(3), {}, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004", "step_00000005"]
    assert load_checkpoint(tmp_path).step == 3

    other = tmp_path / "all"
    for step in range(1, 5):
        save_checkpoint(other, step, _tensors(step), {}, keep=None)
    assert len(list_checkpoints(other)) == 4
    with pytest.raises(CheckpointError, match="keep must be >= 1"):
        save_checkpoint(other, 9, _tensors(), {}, keep=0)


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_tensor_is_never_saved(tmp_path, bad_value):
    tensors = _tensors()
    tensors["lora_current"]["b"][1, 2] = bad_value
    with pytest.raises(NonFiniteError, match=r"group 'lora_current': tensor 'b' \(3, 5\) has 1 non-finite values"):
        save_checkpoint(tmp_path, 1, tensors, {})
    assert list_checkpoints(tmp_path) == []
    assert not (tmp_path / "checkpoints" / "latest").exists()


def test_assert_finite_ignores_integer_tensors():
    assert_finite({"count": torch.tensor([1, 2]), "w": torch.ones(2)}, "x")
    with pytest.raises(NonFiniteError, match=r"loss: tensor 'total' \(\) has 1 non-finite values \(1 NaN, 0 inf\)"):
        assert_finite({"total": torch.tensor(float("nan"))}, "loss")


def test_bad_group_name_and_state_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="tensor group name '../x'"):
        save_checkpoint(tmp_path, 1, {"../x": {}}, {})
    with pytest.raises(CheckpointError, match="'metrics/obj' is a object"):
        save_checkpoint(tmp_path, 1, _tensors(), {"metrics": {"obj": object()}})
    with pytest.raises(CheckpointError, match="must not contain 'step'"):
        save_checkpoint(tmp_path, 1, _tensors(), {"step": 3})


# ---------------------------------------------------------------------------------------------- GracefulExit
# (here because its only job is to let the training loop reach a checkpoint)


def test_graceful_exit_sets_flag_then_restores_previous_handler():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with GracefulExit() as stop:
            assert not stop.should_stop
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.should_stop and stop.received == "SIGTERM"
            assert received == []  # the first signal was ours
            os.kill(os.getpid(), signal.SIGTERM)  # the second one goes to the previous handler
            assert received == [signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_graceful_exit_handles_sigint_and_restores_on_exit():
    before = signal.getsignal(signal.SIGINT)
    with GracefulExit() as stop:
        assert signal.getsignal(signal.SIGINT) != before
    assert not stop.should_stop and signal.getsignal(signal.SIGINT) == before
    with GracefulExit() as stop:
        assert signal.getsignal(signal.SIGINT) != before
        os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt without GracefulExit
        assert stop.should_stop and stop.received == "SIGINT"
    assert signal.getsignal(signal.SIGINT) == before


def test_directory_swap_interrupted_between_renames_is_recovered(tmp_path):
    from rl.checkpoint import interrupted_swap, recover_dir, write_dir_atomically

    out = tmp_path / "critic"
    write_dir_atomically(out, lambda d: (Path(d) / "w.txt").write_text("v1"))
    # the state a kill leaves between `out → .critic.old` and `.critic.tmp → out`
    os.replace(out, tmp_path / ".critic.old")
    (tmp_path / ".critic.tmp").mkdir()
    (tmp_path / ".critic.tmp" / "w.txt").write_text("half")
    assert interrupted_swap(out) == str(tmp_path / ".critic.old")  # readers load v1 from there, read-only
    assert recover_dir(out) and (out / "w.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["critic"]  # the half-written scratch is gone
    assert interrupted_swap(out) is None
    # the next save after such a kill starts from the recovered state and leaves no scratch behind
    os.replace(out, tmp_path / ".critic.old")
    write_dir_atomically(out, lambda d: (Path(d) / "w.txt").write_text("v2"))
    assert (out / "w.txt").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["critic"]


def test_fp16_loss_scale_is_checkpointed_and_restored(tmp_path):
    """fp16 without DeepSpeed: the GradScaler's scale and growth clock go into state.json and come back on resume
    (a fresh scaler would restart at 65536 and skip steps until it backed off again)."""
    from accelerate import Accelerator

    from policies import lora
    from policies.testing import tiny_policy
    from rl import common
    from rl.metrics import MetricLogger

    def make_run():
        policy = tiny_policy()
        lora.add_lora(policy.transformer, lora.LoraSpec(r=4, alpha=8))
        accelerator = Accelerator(cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=7)
        run = common.Run(policy=policy, critic=None, train_prompts=[], eval_prompts=[], eval_metric=None,
                         accelerator=accelerator, logger=MetricLogger(tmp_path, backends=()),
                         run_cfg=common.RunConfig(output_dir=str(tmp_path)), eval_cfg=common.EvalConfig())
        params = list(lora.adapter_parameters(policy.transformer, "default").values())
        return run, torch.optim.AdamW(params, lr=1e-3)

    run, optimizer = make_run()
    scaler = run.accelerator.scaler
    scaler.scale(torch.ones(()))  # the scaler's state starts at its first use
    scaler.update(2.0 ** 10)  # backed off, and three steps into the growth interval
    scaler._growth_tracker = torch.full((), 3, dtype=torch.int32)
    common.save(run, 1, optimizer, ("default",))
    assert rl.checkpoint.load_checkpoint(tmp_path).state["grad_scaler"]["scale"] == 2.0 ** 10

    resumed, optimizer = make_run()
    assert resumed.accelerator.scaler.get_scale() == 2.0 ** 16
    epoch, _ = common.restore(resumed, "latest", optimizer, ("default",))
    assert epoch == 1
    restored = resumed.accelerator.scaler.state_dict()
    assert restored["scale"] == 2.0 ** 10 and restored["_growth_tracker"] == 3 and restored["growth_interval"] == 7


def test_a_killed_re_save_keeps_a_checkpoint_of_that_step(tmp_path, monkeypatch):
    """Re-saving a step moves the old directory to .old.tmp, then the new one in. A kill between the two renames
    left no step directory while `latest` named it, and the next save deleted the leftovers. Now load_checkpoint
    reads the surviving copy without renaming (every process of a run, and rl.evaluate, may load at once), and
    recover_resave (the main process, before a resume) or the next save moves it into place."""
    save_checkpoint(tmp_path, 1, _tensors(), {"v": "one"})
    save_checkpoint(tmp_path, 2, _tensors(), {"v": "old"})
    root = tmp_path / "checkpoints"
    step2 = root / "step_00000002"
    real_replace = os.replace

    def killed_before_the_second_rename(src, dst):
        real_replace(src, dst)
        if str(src).endswith("step_00000002") and str(dst).endswith(".old.tmp"):
            raise KeyboardInterrupt  # the kill

    def killed_resave():
        monkeypatch.setattr(os, "replace", killed_before_the_second_rename)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, 2, _tensors(), {"v": "new"})
        monkeypatch.setattr(os, "replace", real_replace)
        assert not step2.exists() and (root / "step_00000002.old.tmp").is_dir()

    for new_complete in (True, False):
        killed_resave()
        if not new_complete:  # killed earlier in the new one's writing: the old one survives
            (root / "step_00000002.tmp" / "manifest.json").unlink()
        expected = "new" if new_complete else "old"
        for path in (tmp_path, step2):  # through `latest`, and the step's own path
            assert load_checkpoint(path).state["v"] == expected
        assert not step2.exists()  # loading only reads
        recover_resave(tmp_path)
        assert load_checkpoint(step2).state["v"] == expected
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]
        save_checkpoint(tmp_path, 2, _tensors(), {"v": "old"})

    # the next save (of another step) recovers it too, before deleting leftovers
    killed_resave()
    save_checkpoint(tmp_path, 3, _tensors(), {"v": "three"}, keep=None)
    assert load_checkpoint(step2).state["v"] == "new"
    recover_resave(tmp_path / "nothing")  # names no checkpoint: nothing to do


def test_writing_a_directory_over_a_file_is_refused(tmp_path):
    from rl.checkpoint import write_dir_atomically

    target = tmp_path / "critic"
    target.write_text("keep me")
    with pytest.raises(CheckpointError, match="is a file"):
        write_dir_atomically(target, lambda tmp: None)
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["critic"]
