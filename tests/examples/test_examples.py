"""Every script in examples/ runs at a tiny budget, as a user would start it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_train_then_load_lora_in_diffusers(tmp_path):
    _run("examples/train_shapes.py", "--tiny", "--out", str(tmp_path / "run"))
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    stdout = _run("examples/load_lora.py", str(tmp_path / "run" / "lora"), "--tiny", "--steps", "3",
                  "--out", str(tmp_path / "grid.png"))
    assert "wrote" in stdout and (tmp_path / "grid.png").stat().st_size > 0


def test_steer_example(tmp_path):
    stdout = _run("examples/steer.py", "--tiny", "--out", str(tmp_path))
    assert list(tmp_path.glob("*.png")), stdout
