"""Llama-family checkpoints on our one decoder, against transformers on the same weights.

Each case is a tiny random checkpoint built by transformers in the test (tests/helpers/families.py):
Llama with llama3 rope scaling, Llama with linear scaling + attention and MLP biases + tied
embeddings, Mistral (sliding window), Qwen2 (q/k/v biases, tied), Qwen3 (per-head q/k norm,
explicit head_dim 24 != hidden / heads).
"""

from __future__ import annotations

import json

import pytest
import torch

from palm_rlhf import CheckpointError, InputError, PaLM
from palm_rlhf.generation import SamplingConfig, generate
from palm_rlhf.model.families import export_adapter, export_family

from tests.helpers.families import FAMILY_CASES, make_hf_checkpoint

transformers = pytest.importorskip("transformers")

CASES = list(FAMILY_CASES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{case: (directory, transformers model)} built once for the module."""
    out = {}
    for case in CASES:
        directory = tmp_path_factory.mktemp(case)
        out[case] = (directory, make_hf_checkpoint(case, directory))
    return out


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_over_300_tokens(checkpoints, case):
    directory, ref = checkpoints[case]
    ours = PaLM.from_pretrained(directory).eval()
    x = torch.randint(0, ref.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(x).logits, ours(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    assert ours.family == ref.config.model_type and ours.kv_heads == 2


@pytest.mark.parametrize("case", CASES)
def test_cached_decode_equals_the_full_forward(checkpoints, case):
    """Prefill 40 tokens into a cache, then decode 60 one at a time: every step's logits equal the
    full forward's at that position (grouped-query keys in the cache, rotary by slot)."""
    directory, _ = checkpoints[case]
    model = PaLM.from_pretrained(directory).eval()
    x = torch.randint(0, model.num_tokens, (2, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache(2, 100)
        steps = [model.forward_cached(x[:, :40], cache, last_only=False)]
        steps += [model.forward_cached(x[:, t:t + 1], cache, last_only=False) for t in range(40, 100)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["llama", "qwen3"])
def test_hidden_states_at_positions_equal_the_full_result(checkpoints, case):
    model = PaLM.from_pretrained(checkpoints[case][0]).eval()
    x = torch.randint(0, model.num_tokens, (2, 30), generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([[0, 7, 29], [3, 4, 20]])
    with torch.no_grad():
        full = model.hidden_states(x)
        part = model.hidden_states(x, positions=positions)
    torch.testing.assert_close(part, full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1])))


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_transformers(checkpoints, case):
    """Batched, left-padded prompts of different lengths: our greedy tokens equal transformers'
    `generate` (KV cache) wherever transformers' own top-2 logits differ by more than 1e-3."""
    directory, ref = checkpoints[case]
    ours = PaLM.from_pretrained(directory).eval()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, ref.config.vocab_size, (n,), generator=gen) for n in (5, 12)]
    out = generate(ours, prompts, SamplingConfig(max_new_tokens=24, temperature=0.0, seed=0))
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            res = ref.generate(prompt[None], max_new_tokens=24, do_sample=False, eos_token_id=None,
                               pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        theirs = res.sequences[0, len(prompt):]
        mine = out.tokens[i, :out.lengths[i]]
        for t, scores in enumerate(res.scores):
            top2 = scores[0].topk(2).values
            if (top2[0] - top2[1]).item() <= 1e-3:
                break  # a near tie: the two may differ from here on
            assert int(mine[t]) == int(theirs[t]), f"{case}: token {t} differs"


def test_lora_on_every_projection_merges_and_exports_to_transformers_and_peft(checkpoints, tmp_path):
    """A scope on all seven projections: merged == unmerged; the merged model exported to a
    transformers checkpoint gives the same logits there; the scope exported as a peft adapter,
    loaded onto the original checkpoint by peft, gives the unmerged scope's logits."""
    peft = pytest.importorskip("peft")
    directory, ref = checkpoints["qwen2"]
    model = PaLM.from_pretrained(directory).eval()
    model.add_finetune_params("actor", lora_r=4, lora_alpha=8.0, targets=["q", "k", "v", "o", "gate", "up", "down"])
    with torch.no_grad():
        for p in model.finetune_parameters("actor"):
            p.normal_(0, 0.05)
    x = torch.randint(0, model.num_tokens, (2, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base, adapted = model(x), model(x, finetune_scope="actor")
    assert (adapted - base).abs().max().item() > 1e-2  # the scope does something

    export_adapter(model, "actor", tmp_path / "adapter", base_model=str(directory))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (peft_model(x).logits - adapted).abs().max().item() < 1e-4
    peft_model.unload()

    model.merge_finetune_params("actor")
    with torch.no_grad():
        assert (model(x) - adapted).abs().max().item() < 1e-4
    export_family(model, tmp_path / "hf")
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert (loaded.eval()(x).logits - adapted).abs().max().item() < 1e-4


def test_export_shards_above_the_limit_and_loads_back(checkpoints, tmp_path):
    directory, ref = checkpoints["llama"]
    model = PaLM.from_pretrained(directory)
    written = export_family(model, tmp_path / "out", shard_bytes=100_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file() and len(written) > 3
    again = PaLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, model.num_tokens, (1, 40))
    with torch.no_grad():
        assert (again(x) - ref(x).logits).abs().max().item() < 1e-4


def test_our_format_round_trips_a_family_model(checkpoints, tmp_path):
    directory, ref = checkpoints["qwen3"]
    model = PaLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "ours")
    again = PaLM.from_pretrained(tmp_path / "ours").eval()
    x = torch.randint(0, model.num_tokens, (1, 40))
    with torch.no_grad():
        assert torch.equal(again(x), model.eval()(x))
    assert again.family == "qwen3" and not again.tie_embeddings


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_bf16_is_within_the_stated_tolerance(checkpoints, case):
    """dtype=bf16 halves the memory. Measured against fp32 transformers on the same weights, our
    bf16 logits are as close as transformers' own bf16 run: mean error at most 1.25x its mean
    error, largest error at most 1.5x its largest + 0.05 (the tolerance docs/models.md states)."""
    import copy

    directory, ref = checkpoints[case]
    model = PaLM.from_pretrained(directory, dtype="bf16").eval()
    assert model.token_emb.weight.dtype == torch.bfloat16
    assert model.rotary_emb.inv_freq.dtype == torch.float32  # rotary tables stay exact
    ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    x = torch.randint(0, model.num_tokens, (2, 100), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        exact, ours, theirs = ref(x).logits, model(x).float(), ref_bf16(x).logits.float()
    ours_err, their_err = (ours - exact).abs(), (theirs - exact).abs()
    assert ours_err.mean() <= 1.25 * their_err.mean()
    assert ours_err.max() <= 1.5 * their_err.max() + 0.05


def test_sharded_and_pickle_checkpoints_load(checkpoints, tmp_path):
    _, ref = checkpoints["mistral"]
    x = torch.randint(0, ref.config.vocab_size, (1, 30))
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    torch.save(ref.state_dict(), tmp_path / "bin.pt")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes((tmp_path / "bin.pt").read_bytes())
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    for name in ("sharded", "bin"):
        model = PaLM.from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            assert (model(x) - ref(x).logits).abs().max().item() < 1e-4


def test_unsupported_and_broken_checkpoints_get_one_line(checkpoints, tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported.*llama, mistral, qwen2, qwen3"):
        PaLM.from_pretrained(tmp_path / "gpt2")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((checkpoints["llama"][0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        PaLM.from_pretrained(tmp_path / "noweights")
    config = json.loads((checkpoints["llama"][0] / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "yarn").mkdir()
    (tmp_path / "yarn" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        PaLM.from_pretrained(tmp_path / "yarn")


def test_a_context_longer_than_the_sliding_window_is_refused(checkpoints):
    model = PaLM.from_pretrained(checkpoints["mistral"][0])
    assert model.sliding_window == 512
    with pytest.raises(InputError, match="longer than this model's sliding window"):
        model(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(InputError, match="sliding window"):
        model.new_kv_cache(1, 600)


def test_loading_and_running_needs_no_transformers(checkpoints):
    """The library reads a family checkpoint with its own code: a fresh process loads, runs and
    generates without ever importing transformers (the reference in tests only)."""
    import subprocess
    import sys

    code = ("import sys, torch, palm_rlhf\n"
            "from palm_rlhf.generation import SamplingConfig, generate\n"
            f"model = palm_rlhf.load_model({str(checkpoints['qwen3'][0])!r})\n"
            "model(torch.zeros(1, 4, dtype=torch.long))\n"
            "generate(model, [torch.tensor([3, 4])], SamplingConfig(max_new_tokens=3))\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
