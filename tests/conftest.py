"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """The suite runs tiny models on a 2-core CPU, where intra-op threading of small matmuls costs far more in
    thread hand-offs than it saves (~10x slower measured); run single-threaded and restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision in it: a test that runs
    rl/train.py with run.mixed_precision set starts and leaves with none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
