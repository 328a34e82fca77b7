"""Fixtures shared by several test folders."""

import pytest
import torch


@pytest.fixture
def single_thread():
    """Run a test with one torch thread, then restore the previous count.

    Tiny batches gain nothing from more threads, and on a busy 2-core CI machine threads
    spinning against other processes make a test several times slower. The count is
    process-wide, hence the restore. Use with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
