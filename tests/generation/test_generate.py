"""`generate` / `stream` / `PaLM.generate`: batching, stopping, log-probs, seeds, errors."""

from __future__ import annotations

import pytest
import torch

from palm_rlhf.errors import ConfigError, InputError
from palm_rlhf.generation import SamplingConfig, generate, process_logits, stream
from tests.helpers.models import tiny_palm as tiny

V = 64  # tiny()'s num_tokens


def prompts(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in lengths]


GREEDY = SamplingConfig(max_new_tokens=24, temperature=0)


@pytest.mark.parametrize("flash_attn", [False, True])
def test_batch_of_different_lengths_equals_each_prompt_alone(flash_attn, model_factory):
    model = model_factory(randomized=False, flash_attn=flash_attn)
    ps = prompts(3, 9, 1, 6)
    out = generate(model, ps, GREEDY)
    for i, p in enumerate(ps):
        alone = generate(model, [p], GREEDY)
        assert torch.equal(out.tokens[i], alone.tokens[0])
        torch.testing.assert_close(out.log_probs[i], alone.log_probs[0], atol=1e-5, rtol=0)
    assert out.prompt_lengths.tolist() == [3, 9, 1, 6]


def test_padded_tensor_with_lengths_equals_list_of_prompts():
    model = tiny()
    ps = prompts(4, 7)
    padded = torch.zeros(2, 7, dtype=torch.long)
    padded[0, :4], padded[1] = ps[0], ps[1]  # right-padded
    a = generate(model, ps, GREEDY)
    b = generate(model, padded, GREEDY, lengths=torch.tensor([4, 7]))
    assert torch.equal(a.tokens, b.tokens)


def test_eos_stops_one_row_and_pads_after_it_while_others_continue():
    model = tiny(seed=3)
    ps = prompts(5, 5, seed=3)
    free = generate(model, ps, SamplingConfig(max_new_tokens=24, seed=0))
    # an EOS id that row 0 emits (first at step k) and row 1 never emits; the noise for
    # every row is drawn each step, so row 1's draws do not depend on row 0 stopping
    row0, row1 = free.tokens[0].tolist(), free.tokens[1].tolist()
    eos = next(t for t in row0[1:] if t not in row1)
    k = row0.index(eos)
    out = generate(model, ps, SamplingConfig(max_new_tokens=24, seed=0, eos_token=eos))
    assert out.stop_reasons == ["eos", "max_new_tokens"]
    assert out.lengths.tolist() == [k + 1, 24]
    assert out.tokens[0, : k + 1].tolist() == row0[: k + 1]  # EOS included
    assert out.tokens[0, k + 1:].eq(0).all() and not out.mask[0, k + 1:].any()
    assert out.log_probs[0, k + 1:].eq(0).all()
    assert torch.equal(out.tokens[1], free.tokens[1])  # the other row is unaffected


def test_several_eos_ids_each_stop_their_row():
    """eos_token=[a, b] (a checkpoint's eos_ids): row 0 stops at a, row 1 at b, each at its first one."""
    model = tiny(seed=3)
    ps = prompts(5, 5, seed=3)
    free = generate(model, ps, SamplingConfig(max_new_tokens=24, seed=0))
    row0, row1 = free.tokens[0].tolist(), free.tokens[1].tolist()
    a = next(t for t in row0[1:] if t not in row1)
    b = next(t for t in row1[1:] if t not in row0[: row0.index(a) + 1])
    out = generate(model, ps, SamplingConfig(max_new_tokens=24, seed=0, eos_token=[a, b]))
    ends = [row0.index(a) if b not in row0 else min(row0.index(a), row0.index(b)), row1.index(b)]
    assert out.stop_reasons == ["eos", "eos"] and out.lengths.tolist() == [ends[0] + 1, ends[1] + 1]
    assert out.tokens[1, : ends[1] + 1].tolist() == row1[: ends[1] + 1]
    assert SamplingConfig(eos_token=[a, b, a]).eos_ids == (a, b) and SamplingConfig(eos_token=[a]).eos_token == a


def test_stop_sequence_ends_the_row_after_the_sequence():
    model = tiny(seed=4)
    ps = prompts(6, seed=4)
    free = generate(model, ps, SamplingConfig(max_new_tokens=30, temperature=1.0, seed=1))
    row = free.tokens[0].tolist()
    stop = row[10:12]
    first = next(i for i in range(len(row) - 1) if row[i: i + 2] == stop)
    out = generate(model, ps, SamplingConfig(max_new_tokens=30, temperature=1.0, seed=1,
                                             stop_sequences=[stop, [V - 1] * 5]))
    assert out.stop_reasons == ["stop_sequence"]
    assert out.sequences() == [row[: first + 2]]
    assert out.tokens.shape == (1, first + 2)  # trimmed to the longest row


def test_max_new_tokens_bounds_every_row():
    out = generate(tiny(), prompts(2, 5), SamplingConfig(max_new_tokens=7, seed=0))
    assert out.tokens.shape == (2, 7) and out.lengths.tolist() == [7, 7] and out.mask.all()
    assert out.stop_reasons == ["max_new_tokens"] * 2


def test_same_seed_same_output_and_generator_argument():
    model, ps = tiny(), prompts(3, 4)
    cfg = SamplingConfig(max_new_tokens=20, top_k=10, seed=123)
    a, b = generate(model, ps, cfg), generate(model, ps, cfg)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_probs, b.log_probs)
    c = generate(model, ps, SamplingConfig(max_new_tokens=20, top_k=10), generator=torch.Generator().manual_seed(123))
    assert torch.equal(a.tokens, c.tokens)
    d = generate(model, ps, SamplingConfig(max_new_tokens=20, top_k=10, seed=124))
    assert not torch.equal(a.tokens, d.tokens)


@pytest.mark.parametrize("cfg", [
    SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=5, seed=0),
    SamplingConfig(max_new_tokens=12, temperature=1.3, top_p=0.8, min_p=0.05, seed=1),
    SamplingConfig(max_new_tokens=12, temperature=0.9, repetition_penalty=1.5, seed=2),
])
def test_log_probs_are_of_the_sampling_distribution(cfg):
    """Recompute each token's log-prob from a full forward pass: log_softmax of the
    logits after repetition penalty (prompt + earlier tokens), temperature and filters."""
    model = tiny(seed=5)
    p = prompts(5, seed=5)[0]
    out = generate(model, [p], cfg)
    seq = torch.cat([p, out.tokens[0]])
    with torch.no_grad():
        logits = model.logits(seq[None])[0]  # (n + T, V)
    for t in range(out.tokens.shape[1]):
        pos = len(p) + t - 1
        seen = torch.zeros(1, V, dtype=torch.bool)
        seen[0, seq[: pos + 1]] = True
        processed = process_logits(logits[pos][None], cfg, seen)
        expected = processed.log_softmax(-1)[0, out.tokens[0, t]]
        assert torch.isfinite(expected)  # the drawn token survived the filters
        torch.testing.assert_close(out.log_probs[0, t], expected, atol=1e-4, rtol=0)


def test_stream_yields_the_same_tokens_as_generate():
    model, p = tiny(), prompts(4)[0]
    cfg = SamplingConfig(max_new_tokens=15, seed=9, eos_token=None)
    assert list(stream(model, p, cfg)) == generate(model, [p], cfg).sequences()[0]
    eos_cfg = SamplingConfig(max_new_tokens=15, temperature=0, eos_token=generate(model, [p], GREEDY).tokens[0, 2].item())
    streamed = list(stream(model, p, eos_cfg))
    assert streamed == generate(model, [p], eos_cfg).sequences()[0] and streamed[-1] == eos_cfg.eos_token


def test_outputs_are_usable_by_autograd_and_training_mode_is_restored():
    """generate() runs without autograd, yet its tokens must train like any ids (the embedding saves
    them for backward). The gradient they give equals the one from the same ids built afresh, and it
    reaches exactly the embedding rows it must: the ids in the sequences (input side) and the one
    scored column k (output side; to_logits is tied to token_emb), every other row exactly zero."""
    model = tiny().train()
    out = generate(model, prompts(3), SamplingConfig(max_new_tokens=4, seed=0))
    assert model.training
    present = set(out.tokens.flatten().tolist())
    k = min(set(range(V)) - present)  # a column no sequence holds: its row gets the output side alone
    weights = torch.randn(out.tokens.shape, generator=torch.Generator().manual_seed(1))

    def embedding_grad(tokens):
        model.zero_grad(set_to_none=True)
        (model.logits(tokens)[..., k] * weights).sum().backward()
        return model.token_emb.weight.grad.clone()

    grad = embedding_grad(out.tokens)
    torch.testing.assert_close(grad, embedding_grad(torch.tensor(out.tokens.tolist())), rtol=0, atol=0)
    nonzero = {row for row in range(V) if grad[row].abs().sum() > 0}
    assert nonzero == present | {k}


@pytest.mark.parametrize("bad, match", [
    ([torch.tensor([], dtype=torch.long)], "empty"),
    ([torch.tensor([1, V])], f"token id {V}"),
    ([torch.tensor([-1, 2])], "token id -1"),
    ([torch.tensor([1.0, 2.0])], "dtype"),
    ([], "no prompts"),
])
def test_bad_prompts_raise_clear_errors(bad, match):
    with pytest.raises(InputError, match=match):
        generate(tiny(), bad, GREEDY)


def test_bad_lengths_and_config_raise():
    model = tiny()
    with pytest.raises(InputError, match="lengths"):
        generate(model, torch.ones(2, 3, dtype=torch.long), GREEDY, lengths=torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(model, prompts(2), SamplingConfig(max_new_tokens=0))
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(InputError, match="causal"):
        generate(tiny(causal=False), prompts(2), GREEDY)
    with pytest.raises(ConfigError, match="finetune scope"):
        generate(model, prompts(2), GREEDY, finetune_scope="missing")


# ---------------------------------------------------------------- seed-compatible PaLM.generate


def test_palm_generate_matches_seed_package_greedy():
    seed_pkg = pytest.importorskip("palm_rlhf_pytorch")
    from palm_rlhf.model.convert import ours_to_v08

    model = tiny(seed=6)
    ref = seed_pkg.PaLM(dim=32, num_tokens=V, depth=2, heads=2, dim_head=16)
    ref.load_state_dict(ours_to_v08(model.state_dict()))
    prompt = torch.randint(1, V, (3, 7))
    ours = model.generate(40, prompt, temperature=0.0)  # default legacy filter top_k(thres=0.9)
    theirs = ref.generate(40, prompt, temperature=0.0)
    assert ours.shape == (3, 33)  # seq_len includes the prompt
    assert torch.equal(ours, theirs)


def test_palm_generate_seed_conventions():
    model = tiny()
    assert model.generate(10).shape == (1, 10)  # no prompt: random start token, whole sequence returned
    p = torch.randint(1, V, (5,))
    assert model.generate(8, p).shape == (3,)  # 1-D prompt -> 1-D output
    assert model.generate(4, p).shape == (1,)  # at least one new token
    full = model.generate(8, p[None], return_seq_without_prompt=False, filter_logits_fn=None)
    assert torch.equal(full[0, :5], p)


def test_palm_generate_pads_each_row_after_its_eos_and_passes_lora_scope():
    model = tiny(seed=3)
    model.add_finetune_params("sft")
    prompt = torch.stack(prompts(5, 5, seed=3))
    torch.manual_seed(0)
    free = model.generate(29, prompt, filter_logits_fn=None, finetune_scope="sft")
    row0, row1 = free[0].tolist(), free[1].tolist()
    eos = next(t for t in row0[1:] if t not in row1)
    k = row0.index(eos)
    torch.manual_seed(0)
    out = model.generate(29, prompt, filter_logits_fn=None, eos_token=eos, pad_value=0, finetune_scope="sft")
    assert out[0, : k + 1].tolist() == row0[: k + 1] and out[0, k + 1:].eq(0).all()
    assert torch.equal(out[1], free[1])
    with pytest.raises(InputError, match="unsupported"):
        model.generate(8, prompt, extra_embed=None)


def test_one_generator_per_row_makes_each_sample_independent_of_the_batch():
    """With a list of generators, row i draws only from generator i: sampling the batch equals
    sampling each prompt alone with a generator in the same state (what makes RL rollouts identical
    however the prompts are split over processes)."""
    model, ps = tiny(), prompts(3, 7, 5)  # different lengths: left padding differs per row
    cfg = SamplingConfig(max_new_tokens=5)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    batch = generate(model, ps, cfg, generator=gens()).sequences()
    alone = [generate(model, [p], cfg, generator=[g]).sequences()[0] for p, g in zip(ps, gens())]
    assert batch == alone
    with pytest.raises(InputError, match="one torch.Generator per prompt"):
        generate(model, ps, cfg, generator=gens()[:2])


def test_per_row_uniforms_are_drawn_once_per_generate_from_each_rows_generator():
    """`RowUniforms` draws each row's u's for every step in one call on its own generator:
    step t of row i is the t-th draw of generator i, whatever the batch."""
    from palm_rlhf.generation.sampling import RowUniforms

    gens = lambda: [torch.Generator().manual_seed(7 + i) for i in range(2)]  # noqa: E731
    uniforms = RowUniforms(gens(), steps=5, device="cpu")
    for i, g in enumerate(gens()):
        expected = torch.rand(5, generator=g, dtype=torch.float64)
        assert torch.equal(torch.stack([uniforms(t)[i] for t in range(5)]), expected)


@pytest.mark.parametrize("family", [False, True])
def test_prefill_runs_a_repeated_prompt_once_and_equals_the_full_forward(tmp_path, family):
    """`prefill` (what `generate` runs first) on a batch with repeated prompts, as GRPO's groups are,
    fills the same keys and values and gives the same last-token logits as the model's forward over
    every row; a prompt with the same ids but other padding is a different prompt."""
    from palm_rlhf.generation.generate import prefill

    if family:
        pytest.importorskip("transformers")
        from palm_rlhf import PaLM
        from tests.helpers.families import make_hf_checkpoint

        make_hf_checkpoint("llama-linear-bias", tmp_path)
        model = PaLM.from_pretrained(tmp_path).eval()
    else:
        model = tiny().eval()
    model.add_finetune_params("actor", lora_r=4, lora_alpha=8.0)
    with torch.no_grad():
        for p in model.finetune_parameters("actor"):
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, model.num_tokens, (2, 7), generator=g)
    ids = torch.stack([a, b, a, a, b, a])  # two distinct prompts of 7 tokens, 3 + 2 + 1 times
    ids[5, :2] = 0  # left padding: row 5 is a's last 5 tokens, another prompt
    pad = torch.tensor([0, 0, 0, 0, 0, 2])
    with torch.no_grad():
        full, once = model.new_kv_cache(6, 20, pad=pad), model.new_kv_cache(6, 20, pad=pad)
        expected = model.forward_cached(ids, full, finetune_scope="actor")
        orig = model.forward_cached
        rows = []
        model.forward_cached = lambda x, cache, **kw: rows.append(x.shape[0]) or orig(x, cache, **kw)
        got = prefill(model, ids, once, finetune_scope="actor")
        del model.forward_cached
    assert rows == [3]  # a, b and the padded a ran once each
    assert once.length == full.length == 7
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(once.k[:, :, :7], full.k[:, :, :7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(once.v[:, :, :7], full.v[:, :, :7], atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="empty cache"):
        prefill(model, ids, once)


def test_generate_with_repeated_prompts_equals_each_prompt_alone():
    """GRPO's batches (each prompt group_size times, one generator per row): every row samples what
    that prompt alone samples with its generator, although the batch prefills each prompt once."""
    model, (p, q) = tiny(), prompts(4, 6)
    cfg = SamplingConfig(max_new_tokens=6)
    ps = [p, p, q, p, q]
    gens = lambda: [torch.Generator().manual_seed(40 + i) for i in range(len(ps))]  # noqa: E731
    batch = generate(model, ps, cfg, generator=gens())
    for i, (x, gen) in enumerate(zip(ps, gens())):
        alone = generate(model, [x], cfg, generator=[gen])
        assert batch.sequences()[i] == alone.sequences()[0]
        torch.testing.assert_close(batch.log_probs[i, :alone.log_probs.shape[1]], alone.log_probs[0],
                                   atol=1e-5, rtol=0)
