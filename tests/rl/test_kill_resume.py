"""kill -9 a real training run at several points, `--resume latest`, and get the uninterrupted run's LoRA bit for bit."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TINY = str(Path(__file__).with_name("tiny.yaml"))
ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--algo", "nft", "--critic", "terminal", "--config", TINY, "run.max_epochs=4", "run.eval_every=0",
        "run.ckpt_every=1"]


def _cmd(out, *extra):
    return [sys.executable, "-m", "rl.train", *ARGS, f"run.output_dir={out}", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _latest_step(out: Path) -> int:
    latest = out / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("_")[-1]) if latest.is_file() else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    subprocess.run(_cmd(out), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)
    return load_file(out / "lora" / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("kill_after_step", [1, 2, 3])
def test_sigkill_then_resume_is_bit_exact(tmp_path, uninterrupted, kill_after_step):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while _latest_step(out) < kill_after_step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip(f"the run finished before it could be killed after step {kill_after_step}")
    killed_at = _latest_step(out)
    assert killed_at >= kill_after_step and not (out / "lora").exists()
    subprocess.run(_cmd(out, "--resume", "latest"), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)
    resumed = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)
