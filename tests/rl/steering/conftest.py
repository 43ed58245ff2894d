"""The steering tests run tiny models: on a shared 2-core CPU, intra-op threading of (2, 100, 16)-sized matmuls costs
~100x more in thread hand-offs than it saves, so these tests run single-threaded (restored afterwards)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
