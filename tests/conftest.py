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
