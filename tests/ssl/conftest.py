"""One intra-op thread for these tests: their tensors are tiny, and on shared CI cores OpenMP's
spinning worker threads cost far more CPU than they save."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(intra_op_threads):
    before = torch.get_num_threads()
    torch.set_num_threads(intra_op_threads)
    yield
    torch.set_num_threads(before)
