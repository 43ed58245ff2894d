"""kill -9 a critic build mid-distillation: its output directory is absent or a complete earlier checkpoint that loads,
never half-written; a damaged critic directory fails to load with a message that names the file.

The build runs as the command line does (`python -m critics.build --config configs/critic/build_shapes.yaml` on the
tiny Shapes world) and checkpoints the whole output directory after every distillation step, so saves are caught
at every stage. It is frozen with SIGSTOP at random moments: a frozen process runs no more code, so the disk then
holds exactly what a SIGKILL at that instant would leave; the directory is checked and the build resumed. A real
SIGKILL ends it, and a new build into the same directory must still work.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from critics import load
from critics.build import build, load_config
from shapes.models import load_shapes_policy, load_shapes_reward
from tests.critics.tiny_world import BUILD_YAML, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
FILES = {"stitchvm": ["build.json", "interface.json", "interface.png", "stitch.safetensors", "stitchvm.json",
                      "tail.safetensors"],
         "vae_stitch": ["build.json", "interface.json", "interface.png", "stitch.safetensors", "tail.safetensors",
                        "vae_stitch.json"]}
SNAPSHOTS = 25


def check_critic_dir(out: Path, policy, reward) -> str:
    """'absent', or 'complete': every file of a finished build there and readable, and the critic loads. Fails
    otherwise."""
    if not out.exists():
        previous = Path(out.parent / f".{out.name}.old")
        if not previous.exists():
            return "absent"
        out = previous  # killed between the swap's two renames: the last complete version waits in .old
        assert load.resolve_path(out.parent / "critic") == previous
    names = sorted(p.name for p in out.iterdir())
    assert set(FILES["stitchvm"]) <= set(names), f"half-written output directory: {names}"
    for name in names:
        if name.endswith(".safetensors"):
            assert load_file(out / name)
        elif name.endswith(".json"):
            json.loads((out / name).read_text())
    load.stitchvm(policy, reward, out)
    return "complete"


def _wait_stopped(proc: subprocess.Popen) -> None:
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the build exited while being frozen (status {status})"


def test_sigkill_mid_distillation_leaves_a_complete_checkpoint_or_nothing(world, tmp_path):
    out, log = tmp_path / "critic", tmp_path / "build.log"
    overrides = tiny_overrides(world, out, "data.num_samples=100000", "distill.max_steps=5000", "distill.ckpt_every=1",
                               "distill.log_every=1000")
    policy, reward = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    with open(log, "wb") as sink:  # not a pipe: an unread pipe would fill up and block the build
        proc = subprocess.Popen([sys.executable, "-m", "critics.build", "--config", BUILD_YAML, *overrides], cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not out.exists():  # the first checkpoint
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        rng, states = random.Random(0), []
        for _ in range(SNAPSHOTS):
            time.sleep(rng.uniform(0, 0.05))
            proc.send_signal(signal.SIGSTOP)
            _wait_stopped(proc)
            try:
                states.append(check_critic_dir(out, policy, reward))
            finally:
                proc.send_signal(signal.SIGCONT)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build ended before it was killed:\n" + log.read_text()[-3000:]
    states.append(check_critic_dir(out, policy, reward))
    assert "complete" in states
    # an interrupted save leaves at most its two fixed scratch names next to the output (never piles of copies)
    assert {p.name for p in tmp_path.iterdir() if p not in (out, log)} <= {".critic.tmp", ".critic.old"}
    # and a new build into the same directory replaces the killed one's checkpoint
    result = build(load_config(BUILD_YAML, tiny_overrides(world, out, "distill.max_steps=2")))
    assert check_critic_dir(out, policy, reward) == "complete"
    assert json.loads((out / "build.json").read_text())["steps"] == len(result.stats["distill/loss"]) == 2


@pytest.mark.parametrize("kind", ["stitchvm", "vae_stitch"])
def test_a_damaged_critic_directory_is_an_error_naming_the_file(built, world, tmp_path, kind):
    source = built[0 if kind == "stitchvm" else 1].output_dir
    policy, reward = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    loader = getattr(load, kind)
    for name in FILES[kind]:
        if name in ("build.json", "interface.json", "interface.png"):  # the build's record, never read by loading
            continue
        for damage in ("missing", "truncated", "garbage"):
            broken = tmp_path / f"{kind}-{name}-{damage}"
            shutil.copytree(source, broken)
            if damage == "missing":
                (broken / name).unlink()
            elif damage == "truncated":
                data = (broken / name).read_bytes()
                (broken / name).write_bytes(data[: len(data) // 2])
            else:
                (broken / name).write_bytes(b"\x00\xff not what was written \xfe")
            with pytest.raises((FileNotFoundError, ValueError)) as e:
                loader(policy, reward, broken)
            assert str(broken / name) in str(e.value), f"{damage} {name}: {e.value}"


def test_a_complete_copy_in_the_working_directory_wins_over_a_backup_at_the_repo_root(tmp_path, monkeypatch):
    # relative critic paths are read from the current directory when they exist there; the repository root's
    # `.name.old` (an interrupted save there) only stands in for a copy that exists nowhere
    cwd, root = tmp_path / "cwd", tmp_path / "root"
    (cwd / "critic").mkdir(parents=True)
    (root / ".critic.old").mkdir(parents=True)
    monkeypatch.setattr(load, "REPO_ROOT", root)
    monkeypatch.chdir(cwd)
    assert load.resolve_path("critic") == Path("critic")
    (cwd / "critic").rmdir()
    assert load.resolve_path("critic") == root / ".critic.old"


@pytest.mark.parametrize("kind", [0, 1], ids=["stitchvm", "vae_stitch"])
def test_a_checkpoint_of_an_unfinished_build_loads_with_a_warning(built, world, tmp_path, capsys, kind):
    from rl.checkpoint import write_manifest

    out = built[kind].output_dir
    policy, reward = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    loader = load.stitchvm if kind == 0 else load.vae_stitch
    capsys.readouterr()
    loader(policy, reward, out)
    assert "did not finish" not in capsys.readouterr().err  # the build's last save records its total time
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    record = json.loads((partial / "build.json").read_text())
    del record["times"]["total_s"]
    (partial / "build.json").write_text(json.dumps({**record, "last_step": 7}))
    write_manifest(partial)
    loader(policy, reward, partial)
    assert "build that did not finish ({'last_step': 7})" in capsys.readouterr().err
