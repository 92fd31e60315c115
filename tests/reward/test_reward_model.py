import math

import pytest
import torch

from palm_rlhf import PaLM
from palm_rlhf.errors import CheckpointError, ConfigError, InputError
from palm_rlhf.model.convert import v08_to_ours
from palm_rlhf.model.reward import RewardModel, pack_prompt_response

CFG = dict(num_tokens=64, dim=32, depth=2, heads=2, dim_head=16)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def _batch():
    x = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 4:] = False
    prompt_lengths = torch.tensor([3, 2, 1])
    return x, mask, prompt_lengths


def _seed_and_ours(num_bins, pooling):
    seed = pytest.importorskip("palm_rlhf_pytorch")
    torch.manual_seed(0)
    seed_rm = _randomize(seed.RewardModel(seed.PaLM(**CFG), dropout=0.0, num_binned_output=num_bins,
                                          sample_from_bins=False)).eval()
    state = seed_rm.state_dict()
    palm_part = v08_to_ours({k[5:]: v for k, v in state.items() if k.startswith("palm.")})
    converted = {**{k: v for k, v in state.items() if not k.startswith("palm.")},
                 **{"palm." + k: v for k, v in palm_part.items()}}
    ours = RewardModel(PaLM(**CFG), dropout=0.0, num_binned_output=num_bins, pooling=pooling)
    ours.load_state_dict(converted, strict=True)  # same parameter names, nothing missing or extra
    return seed_rm, ours.eval()


@pytest.mark.parametrize("disable_lora", [False, True])
def test_scalar_parity_with_seed_package(disable_lora):
    seed_rm, ours = _seed_and_ours(0, pooling="mean")
    x, mask, plens = _batch()
    with torch.no_grad():
        expected = seed_rm(x, mask=mask, prompt_lengths=plens, disable_lora=disable_lora)
        got = ours(x, mask=mask, prompt_lengths=plens, disable_lora=disable_lora)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        labels = torch.tensor([0.5, -1.0, 2.0])
        torch.testing.assert_close(ours(x, mask=mask, prompt_lengths=plens, labels=labels),
                                   seed_rm(x, mask=mask, prompt_lengths=plens, labels=labels), atol=1e-5, rtol=1e-5)


def test_binned_parity_with_seed_package_and_expected_rating():
    seed_rm, ours = _seed_and_ours(5, pooling="mean")
    x, mask, plens = _batch()
    with torch.no_grad():
        seed_logits = seed_rm(x, mask=mask, prompt_lengths=plens)  # seed, sampling off: bin logits
        torch.testing.assert_close(ours.head(x, mask=mask, prompt_lengths=plens), seed_logits, atol=1e-5, rtol=1e-5)
        labels = torch.tensor([0, 4, 2])
        torch.testing.assert_close(ours(x, mask=mask, prompt_lengths=plens, labels=labels),
                                   seed_rm(x, mask=mask, prompt_lengths=plens, labels=labels), atol=1e-5, rtol=1e-5)
        # default inference: the probability-weighted bin value, the same on every call
        expected = (seed_logits.softmax(-1) * torch.arange(5.0)).sum(-1)
        torch.testing.assert_close(ours(x, mask=mask, prompt_lengths=plens), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x, mask=mask, prompt_lengths=plens), expected, atol=1e-5, rtol=1e-5)


def test_expected_rating_hand_computed():
    """logits [0, 0, ln 2] -> probs [1/4, 1/4, 1/2] -> 0*1/4 + 1*1/4 + 2*1/2 = 1.25."""
    rm = RewardModel(PaLM(**CFG), num_binned_output=3)
    assert rm.expected_rating(torch.tensor([[0.0, 0.0, math.log(2)]])).item() == pytest.approx(1.25)


def test_sampling_only_when_asked():
    torch.manual_seed(0)
    rm = _randomize(RewardModel(PaLM(**CFG), dropout=0.0, num_binned_output=4, sample_from_bins=True)).eval()
    x, mask, plens = _batch()
    out = rm(x, mask=mask, prompt_lengths=plens)
    assert out.dtype == torch.long and out.shape == (3,) and int(out.min()) >= 0 and int(out.max()) < 4
    with pytest.raises(ConfigError, match="num_binned_output"):
        RewardModel(PaLM(**CFG), sample_from_bins=True)


def test_response_mean_and_last_pooling():
    """response_mean over only response tokens equals pooling='mean' on the response slice of the embeddings;
    'last' equals the embedding of the last unmasked token."""
    torch.manual_seed(0)
    rm = _randomize(RewardModel(PaLM(**CFG), dropout=0.0)).eval()
    x, mask, plens = _batch()
    with torch.no_grad():
        prompt_mask = torch.arange(10)[None] < plens[:, None]
        extra = torch.where(prompt_mask[..., None], rm.prompt_embed, rm.response_embed)
        emb = rm.palm.embed(x, finetune_scope="reward", extra_embed=extra)
        w = rm.to_pred[0].weight[0]
        for i in range(3):
            resp = mask[i] & ~prompt_mask[i]
            want = emb[i][resp].mean(0) @ w
            assert rm(x, mask=mask, prompt_lengths=plens)[i].item() == pytest.approx(want.item(), abs=1e-5)
        rm.pooling = "last"
        last = torch.tensor([9, 6, 3])
        want = emb[torch.arange(3), last] @ w
        torch.testing.assert_close(rm(x, mask=mask, prompt_lengths=plens), want, atol=1e-5, rtol=1e-5)


def test_callers_palm_is_never_modified():
    palm = PaLM(**CFG, attn_dropout=0.0, ff_dropout=0.0)
    before = {k: v.clone() for k, v in palm.state_dict().items()}
    rm = RewardModel(palm, dropout=0.3, use_lora=True, reward_lora_scope="reward")
    with torch.no_grad():
        for p in rm.parameters():
            p.add_(1.0)
    assert dict(palm.finetune_modules) == {} and palm.finetune_scope_ranks == {}
    assert all(m.p == 0.0 for m in palm.modules() if isinstance(m, torch.nn.Dropout))
    after = palm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_finetune_parameters_lora_vs_full():
    rm = RewardModel(PaLM(**CFG), use_lora=True)
    ids = {id(p) for p in rm.finetune_parameters()}
    assert id(rm.prompt_embed) in ids and id(rm.to_pred[0].weight) in ids
    assert not any(id(p) in ids for p in rm.palm.palm_parameters())
    full = RewardModel(PaLM(**CFG), use_lora=False)
    assert {id(p) for p in full.palm.parameters()} <= {id(p) for p in full.finetune_parameters()}


def test_score_matches_one_by_one_and_pads_right():
    torch.manual_seed(0)
    rm = _randomize(RewardModel(PaLM(**CFG), dropout=0.0))
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([9]), torch.tensor([1, 2])]
    responses = [torch.tensor([8]), torch.tensor([3, 4, 5, 6, 7]), torch.tensor([11, 12])]
    batched = rm.score(prompts, responses, batch_size=2)
    single = torch.cat([rm.score([p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert rm.training  # score() restores the mode it found


def test_pack_truncates_prompt_from_the_left():
    x, mask, plens = pack_prompt_response([torch.tensor([1, 2, 3, 4])], [torch.tensor([5, 6])], max_len=4)
    assert x.tolist() == [[3, 4, 5, 6]] and plens.tolist() == [2] and mask.all()
    x, mask, plens = pack_prompt_response([[1, 2], [3]], [[4], [5, 6, 7]])
    assert x.tolist() == [[1, 2, 4, 0], [3, 5, 6, 7]] and mask.sum(1).tolist() == [3, 4] and plens.tolist() == [2, 1]
    with pytest.raises(InputError):
        pack_prompt_response([[1]], [])


@pytest.mark.parametrize("num_bins,use_lora", [(0, True), (4, False)])
def test_save_and_load_pretrained(tmp_path, num_bins, use_lora):
    torch.manual_seed(0)
    palm = PaLM(**CFG)
    palm.add_finetune_params("sft", lora_r=4)  # a scope that existed before the reward scope
    rm = _randomize(RewardModel(palm, dropout=0.0, num_binned_output=num_bins, use_lora=use_lora,
                                pooling="last")).eval()
    rm.save_pretrained(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    assert loaded.pooling == "last" and loaded.binned_output == (num_bins > 0)
    x, mask, plens = _batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, mask=mask, prompt_lengths=plens), rm(x, mask=mask, prompt_lengths=plens))
    with pytest.raises(CheckpointError, match="RewardModel"):
        palm.save_pretrained(tmp_path / "palm")
        RewardModel.from_pretrained(tmp_path / "palm")
    with pytest.raises(CheckpointError, match="holds a reward model, not a PaLM.*reward score"):
        PaLM.from_pretrained(tmp_path / "rm")  # what `palm-rlhf generate runs/rm` hit as a TypeError


def test_bad_arguments_raise():
    with pytest.raises(ConfigError, match="pooling"):
        RewardModel(PaLM(**CFG), pooling="max")
    rm = RewardModel(PaLM(**CFG))
    x, mask, plens = _batch()
    with pytest.raises(InputError, match="not both"):
        rm(x, prompt_mask=mask, prompt_lengths=plens)


def test_dropout_reaches_attention_of_the_copy_only():
    """set_dropout on the private copy updates every nn.Dropout, attention's included (the
    blocks pass `attn_dropout.p` to SDPA); the caller's PaLM keeps its own."""
    palm = PaLM(**CFG, flash_attn=True)
    rm = RewardModel(palm, dropout=0.25)
    assert all(layer.fn.attn_dropout.p == 0.25 for layer in rm.palm.layers)
    assert all(m.p == 0.25 for m in rm.palm.layers.modules() if isinstance(m, torch.nn.Dropout))
    assert all(layer.fn.attn_dropout.p == 0.0 for layer in palm.layers)


@pytest.mark.parametrize("pooling", ["response_mean", "last", "response_mean_last", "mean"])
def test_pooling_reads_only_the_positions_it_needs_with_full_forward_gradients(pooling):
    """The head computes the last block only at the pooled positions (`PaLM.embed(positions=...)`);
    rewards and gradients equal pooling the full embeddings (a row with an empty response
    included: it pools to zeros)."""
    torch.manual_seed(0)
    rm = _randomize(RewardModel(PaLM(**CFG), dropout=0.0, pooling=pooling))
    x, mask, plens = _batch()
    plens = torch.tensor([3, 7, 1])  # row 1: every real token is prompt -> empty response
    prompt_mask = torch.arange(10)[None] < plens[:, None]
    extra = torch.where(prompt_mask[..., None], rm.prompt_embed, rm.response_embed)

    def reference():
        emb = rm.palm.embed(x, finetune_scope="reward", extra_embed=extra)
        last = torch.nn.functional.one_hot(torch.tensor([9, 6, 3]), 10).bool()
        keep = {"mean": mask, "response_mean": mask & ~prompt_mask, "last": last,
                "response_mean_last": mask & ~prompt_mask}[pooling]
        pooled = (emb * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        if pooling == "response_mean_last":  # plus the last response token (none in the empty row 1)
            pooled = pooled + (emb * (last & keep)[..., None]).sum(1)
        return rm.to_pred(pooled)

    def grads(fn):
        rm.zero_grad(set_to_none=True)
        out = fn()
        out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}

    ref, ref_grads = grads(reference)
    out, got = grads(lambda: rm(x, mask=mask, prompt_lengths=plens))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert got.keys() == ref_grads.keys()
    for name in got:
        torch.testing.assert_close(got[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_embed_positions_are_validated():
    palm = PaLM(**CFG)
    x = torch.randint(0, 64, (2, 5))
    with pytest.raises(InputError, match="positions must lie in"):
        palm.embed(x, positions=torch.tensor([[0, 5], [1, 2]]))
    with pytest.raises(InputError, match="integer"):
        palm.embed(x, positions=torch.tensor([[0.0, 1.0], [1.0, 2.0]]))
    torch.testing.assert_close(palm.embed(x, positions=torch.tensor([[4], [0]])),
                               palm.embed(x)[torch.arange(2), torch.tensor([4, 0])][:, None], atol=1e-6, rtol=1e-5)
