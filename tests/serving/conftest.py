"""One torch thread for the in-process engine tests: tiny models decode fastest that way, and a
shared CPU does not make every small op wait for a second thread."""

import pytest
import torch

from palm_rlhf.model import PaLM


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    """A tiny random PaLM for the in-process engine tests."""
    torch.manual_seed(0)
    return PaLM(dim=32, num_tokens=256, depth=2, heads=2, dim_head=16).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random PaLM saved with `save_pretrained`, for the tests that start servers or engine processes."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("serve") / "tiny"
    PaLM(dim=32, num_tokens=256, depth=2, heads=2, dim_head=16).save_pretrained(directory)
    return directory
