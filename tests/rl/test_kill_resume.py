"""kill -9 real training runs (NFT, GRPO, DDPO, DRaFT) at several points, `--resume latest` after each kill, and get
the uninterrupted run's LoRA bit for bit. The second interruption of every run is a SIGTERM instead: the run must
write a checkpoint of the epoch it was in, exit 0, and resume from there to the same bit-exact result.

Each trainer runs with the state its resume has to restore switched on: NFT its "old" adapter, GRPO a co-trained
critic (parameters + AdamW) and dense advantages, DDPO its per-prompt reward history (two prompts, so every epoch
after the first normalises by the restored buffer), DRaFT an EMA adapter, the early stop and a co-trained critic.
"""

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl import train

TINY = str(Path(__file__).with_name("tiny.yaml"))
ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--config", TINY, "run.max_epochs=4", "run.eval_every=0", "run.ckpt_every=1"]
COTRAIN = ["critic._component_=tests.rl.test_cotrain.tiny_stitchvm_critic", "+critic.cotrain.enabled=true",
           "+critic.cotrain.lr=1e-3"]
# tiny.yaml's algo node is DiffusionNFT's: the others drop the keys they do not have
ARGS = {
    "nft": ["--algo", "nft", "--critic", "terminal"],
    "grpo": ["--algo", "grpo", "--critic", "terminal", "~algo.tau_min", "~algo.tau_max", *COTRAIN,
             "algo.advantages=dense", "algo.timestep_fraction=0.5"],
    "ddpo": ["--algo", "ddpo", "--critic", "terminal", "~algo.tau_min", "~algo.tau_max", "prompts.train.n=2",
             "algo.stat_min_count=3", "algo.timestep_fraction=0.5"],
    "draft": ["--algo", "draft", "--critic", "terminal", "~algo.group_size", "~algo.rollout_batch_size", *COTRAIN,
              "reward._component_=tests.rl.test_draft.Redness", "algo.ema_decay=0.5"],
}
LORA = Path("lora") / "pytorch_lora_weights.safetensors"
# One run per trainer, killed after each of these steps in turn, every kill followed by `--resume latest` (so later
# kills hit a resumed run). Every step is an interpreter start (~8 s of imports), so the four chains run two at a time.
KILL_AFTER = {"nft": [1, 2], "grpo": [1, 2], "ddpo": [1, 2], "draft": [1, 2]}  # of 4 epochs
SIGNALS = [signal.SIGKILL, signal.SIGTERM]  # the signal of each interruption of a chain


def _cmd(algo, out, *extra):
    return [sys.executable, "-m", "rl.train", *ARGS[algo], *COMMON, f"run.output_dir={out}", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _latest_step(out: Path) -> int:
    latest = out / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("_")[-1]) if latest.is_file() else 0


def _run_and_kill(cmd, out: Path, kill_after_step: int, sig: int = signal.SIGKILL) -> bool:
    """Start ``cmd``; send ``sig`` once checkpoint ``kill_after_step`` exists. False if it finished first.

    SIGTERM must end the run cleanly (exit 0) with a checkpoint of the epoch it was in."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while _latest_step(out) < kill_after_step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    finished = proc.poll() is not None
    proc.send_signal(sig)
    _, err = proc.communicate()
    if finished or (out / LORA).exists():
        assert proc.returncode == 0, err.decode()[-3000:]
        return False
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
        assert _latest_step(out) >= kill_after_step
    else:  # graceful: the epoch in flight is finished and checkpointed, then a clean exit
        assert proc.returncode == 0, f"SIGTERM: exit {proc.returncode}\n" + err.decode()[-3000:]
        assert _latest_step(out) >= kill_after_step + 1, "SIGTERM did not checkpoint the epoch it interrupted"
    return True


def _kill_chain(algo: str, out: Path) -> tuple[int, dict]:
    """Kill the run after each step of KILL_AFTER[algo], resume, finish; (number of kills, final LoRA)."""
    kills = 0
    for i, step in enumerate(KILL_AFTER[algo]):
        if not _run_and_kill(_cmd(algo, out, *(["--resume", "latest"] if i else [])), out, step, SIGNALS[i]):
            break  # it finished before it could be killed: nothing left to interrupt
        kills += 1
    if kills and not (out / LORA).exists():
        resumed = subprocess.run(_cmd(algo, out, "--resume", "latest"), cwd=ROOT, env=_env(), capture_output=True,
                                 timeout=600)
        assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    return kills, load_file(out / LORA)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per trainer: (the uninterrupted run's LoRA, the killed chain's future). The uninterrupted runs go in this
    process while the chains run (the same code as the CLI without the imports; single-threaded like the
    subprocesses, so the CPU arithmetic is the same)."""
    outs = {algo: (tmp_path_factory.mktemp(f"full-{algo}"), tmp_path_factory.mktemp(f"killed-{algo}"))
            for algo in KILL_AFTER}
    with ThreadPoolExecutor(max_workers=2) as pool:
        chains = {algo: pool.submit(_kill_chain, algo, killed / "run") for algo, (_, killed) in outs.items()}
        references = {}
        for algo, (full, _) in outs.items():
            assert train.main([*ARGS[algo], *COMMON, f"run.output_dir={full}"]) == 0
            references[algo] = load_file(full / LORA)
        concurrent.futures.wait(chains.values())
    return {algo: (references[algo], chains[algo]) for algo in KILL_AFTER}


@pytest.mark.parametrize("algo", sorted(KILL_AFTER))
def test_sigkill_then_resume_is_bit_exact(runs, algo):
    reference, chain = runs[algo]
    kills, lora = chain.result()  # re-raises the chain's failure here
    if kills == 0:
        pytest.skip(f"the run finished before it could be killed after step {KILL_AFTER[algo][0]}")
    assert lora.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(lora[key], value, rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")
