"""One torch thread for the in-process engine tests: tiny models decode fastest that way, and a
shared CPU does not make every small op wait for a second thread."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
