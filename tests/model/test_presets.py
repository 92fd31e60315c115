"""Named sizes: the PaLM paper's configurations instantiate on `meta` and have
the paper's parameter counts (Chowdhery et al. 2022, Table 1).

Hand count for 8B (dim d=4096, 32 layers, 16 heads x 256, vocab V=256000, ff 4d, MQA):
  per layer: fused d*(4096 + 2*256 + 2*16384) = 153,092,096
             attn_out 4096*4096 = 16,777,216;  ff_out 16384*4096 = 67,108,864
             -> 236,978,176 x 32 = 7,583,301,632
  embedding (tied, counted once) V*d = 1,048,576,000
  total 8,631,877,632 -> 8.63B; + 33 LayerNorm gains of 4096 = 8,632,012,800.
"""

from __future__ import annotations

import resource

import pytest
import torch

from palm_rlhf.errors import ConfigError
from palm_rlhf.model import PaLM
from palm_rlhf.model.presets import build_preset, list_presets, load_preset, parameter_count

PAPER = {"palm-8b": 8.63, "palm-62b": 62.50, "palm-540b": 540.35}  # billions, as printed in Table 1


def test_presets_exist_and_load():
    names = list_presets()
    assert {"palm-tiny", "palm-small", "palm-medium", *PAPER} <= set(names)
    assert load_preset("palm-8b") == dict(dim=4096, depth=32, heads=16, dim_head=256, ff_mult=4, num_tokens=256000)
    assert load_preset("palm-62b")["dim"] == 8192 and load_preset("palm-540b")["depth"] == 118


def test_hand_count_8b():
    config = load_preset("palm-8b")
    assert parameter_count(**config, include_norms=False) == 8_631_877_632
    assert parameter_count(**config) == 8_632_012_800


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_sizes_on_meta(name):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    model = build_preset(name, device="meta")
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.is_meta for t in tensors)
    count = model.num_parameters()
    assert count == parameter_count(**load_preset(name))  # the closed form is the model's count
    assert count * 4 > 30e9  # fp32 weights would need >30 GB had anything been allocated
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 1_000_000  # < 1 GiB
    # the paper's table counts the embedding and dense kernels, not the LayerNorm gains
    config = load_preset(name)
    kernels = parameter_count(**config, include_norms=False)
    assert round(kernels / 1e9, 2) == PAPER[name]
    assert count - kernels == (config["depth"] + 1) * config["dim"]


def test_small_presets_build_and_run():
    model = build_preset("palm-tiny").eval()
    assert model.device.type == "cpu" and model.num_parameters() == parameter_count(**load_preset("palm-tiny"))
    assert model(torch.randint(0, 256, (1, 8))).shape == (1, 8, 256)
    # qk_rmsnorm adds two dim_head scales per layer; overrides reach the constructor
    model = build_preset("palm-tiny", qk_rmsnorm=True)
    assert model.num_parameters() == parameter_count(**load_preset("palm-tiny"), qk_rmsnorm=True)


def test_preset_from_path_and_errors(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("dim: 16\ndepth: 1\nnum_tokens: 10\nheads: 1\ndim_head: 8\n")
    assert isinstance(build_preset(path), PaLM)
    with pytest.raises(ConfigError, match=r"unknown model preset 'palm-9b'; available: .*palm-8b"):
        load_preset("palm-9b")
    path.write_text("dim: 16\ndepht: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['depht'\]; valid keys: .*depth"):
        load_preset(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_preset(path)
