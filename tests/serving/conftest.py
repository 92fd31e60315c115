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


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    """A tiny random Qwen2-family checkpoint (grouped-query attention, q/k/v biases) built by
    transformers and loaded on our decoder, vocabulary 256 (the byte tokenizer's)."""
    pytest.importorskip("transformers")
    from tests.helpers.families import make_hf_checkpoint

    directory = tmp_path_factory.mktemp("family")
    make_hf_checkpoint("qwen2", directory, vocab=256)
    return PaLM.from_pretrained(directory).eval()
