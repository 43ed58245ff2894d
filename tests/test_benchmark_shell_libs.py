"""benchmarks/session3_lib.sh, the GPU calls' shared shell functions: with `python` stubbed by a shell function,
`finish` keeps each run's metrics, names a run that exited non-zero or left no metrics, and an OUT with spaces is
refused before anything is written (an unquoted `rm -rf $OUT/runs` would have hit a sibling directory)."""

import shutil
import subprocess
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "benchmarks" / "session3_lib.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_bash(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_finish_reports_exit_status_and_missing_metrics(tmp_path):
    out = tmp_path / "out"
    script = f"""set -u
OUT={out}; source {LIB}
python() {{ [ "$RC" = skip ] && return 1; mkdir -p "$OUT/runs/$N"; echo '{{"step": 1}}' > "$OUT/runs/$N/metrics.jsonl"; return $RC; }}
N=ok RC=0 train 0 grpo stitchvm ok
N=bad RC=3 train 1 ddpo stitchvm bad
N=none RC=skip train 2 grpo terminal none
wait
SESSION=99 finish ok bad none
"""
    res = run_bash(script)
    assert res.returncode == 0, res.stderr
    assert "== ok: EXIT" not in res.stdout
    assert "== bad: EXIT STATUS 3" in res.stdout
    assert "== none: EXIT STATUS 1" in res.stdout and "== none: NO metrics.jsonl" in res.stdout
    assert (out / "s99_ok.jsonl").read_text().strip() == '{"step": 1}'
    assert (out / "s99_bad.jsonl").exists() and not (out / "s99_none.jsonl").exists()
    assert not (out / "runs").exists()  # the run directories are dropped: the device tool returns 8 files


def test_out_with_spaces_is_refused(tmp_path):
    out = tmp_path / "a b"
    res = run_bash(f"set -u\nOUT='{out}'; source {LIB}\necho sourced")
    assert res.returncode == 2 and "without spaces" in res.stderr
    assert "sourced" not in res.stdout and not out.exists()


def test_crit_prints_a_builds_non_zero_exit_status(tmp_path):
    lib = LIB.with_name("critic_call_lib.sh")
    script = f"""set -u
OUT={tmp_path / "out"}; source {lib}
timeout() {{ shift; "$@"; }}
env() {{ while [[ "$1" == *=* ]]; do shift; done; "$@"; }}
python() {{ return $RC; }}
RC=0 crit 0 ok
RC=124 crit 1 stopped
RC=1 crit 2 failed
"""
    res = run_bash(script)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["== build stopped: exit status 124 (stopped after BUILD_S) (log/stopped.txt)",
                                       "== build failed: exit status 1 (log/failed.txt)"]


def test_end_call_waits_keeps_each_runs_metrics_and_packs_the_logs(tmp_path):
    out = tmp_path / "out"
    script = f"""set -u
OUT={out}; source {LIB}
nvidia-smi() {{ echo FAKE-GPU; }}
python() {{ sleep 0.2; mkdir -p "$OUT/runs/$N"; echo '{{"step": 2}}' > "$OUT/runs/$N/metrics.jsonl"; }}
N=a train 0 grpo stitchvm a
N=b train 1 ddpo stitchvm b
end_call 16 a b
"""
    res = run_bash(script)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "FAKE-GPU" and "EXIT STATUS" not in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar", "s16_a.jsonl", "s16_b.jsonl"]  # waited for both
