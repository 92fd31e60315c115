"""CUDA readiness (marker `gpu`; every test skips cleanly without CUDA): CPU and CUDA logits
agree, bf16 and fp16 (grad scaler) training steps learn, attention runs on SDPA's flash or
memory-efficient kernel, compiled decoding equals eager decoding, torchrun trains on 2 GPUs, a
Llama-family checkpoint matches transformers on CUDA, and the serving engine runs there.

Run them with `pytest -m gpu` on a machine with a GPU (CI has none; see benchmarks/README.md
for when they last ran and on which card).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from palm_rlhf.generation import SamplingConfig, generate
from palm_rlhf.model import PaLM
from palm_rlhf.ops import token_cross_entropy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for torchrun "
                              f"--nproc_per_node 2; this machine has {torch.cuda.device_count()}")
CFG = dict(dim=128, num_tokens=256, depth=2, heads=4, dim_head=64)


def model_on(device, seed=0, **kw):
    torch.manual_seed(seed)
    return PaLM(**{**CFG, **kw}).to(device)


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would make CUDA fp32 products differ from the CPU's by ~1e-3."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@torch.no_grad()
def test_cpu_and_cuda_logits_agree():
    cpu = model_on("cpu").eval()
    cpu.add_finetune_params("sft")
    for p in cpu.finetune_parameters("sft"):
        p.normal_(std=0.05)
    cuda = PaLM(**CFG)
    cuda.add_finetune_params("sft")
    cuda.load_state_dict(cpu.state_dict())
    cuda = cuda.cuda().eval()
    x = torch.randint(1, 256, (3, 200), generator=torch.Generator().manual_seed(1))
    for scope in (None, "sft"):
        expected = cpu(x, finetune_scope=scope)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(cuda(x.cuda(), finetune_scope=scope).cpu(), expected, atol=1e-4, rtol=1e-4)
    cache = cuda.new_kv_cache(3, 210)
    prefill = cuda.forward_cached(x.cuda(), cache, last_only=False).cpu()  # the cached path too
    torch.testing.assert_close(prefill, cpu(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_steps_learn(precision):
    from palm_rlhf.runtime.optim import OptimConfig, build_optimizer
    from palm_rlhf.runtime.step import TrainStep

    model = model_on("cuda").train()
    stepper = TrainStep(model, build_optimizer(model, OptimConfig(lr=3e-3)), None, precision=precision)
    assert (stepper.scaler is not None) == (precision == "fp16")
    batch = torch.randint(1, 256, (4, 129), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = [stepper(lambda b: token_cross_entropy(model(b[:, :-1]), b[:, 1:]), [batch], step=i).loss
              for i in range(8)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses  # memorising one batch: the loss falls fast
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_attention_runs_on_a_fused_sdpa_kernel(dtype):
    """With only the flash and memory-efficient kernels allowed, SDPA raises instead of falling
    back to the math kernel: training, scoring at positions and cached decoding all pass."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = model_on("cuda").to(dtype).train()
    x = torch.randint(1, 256, (2, 512), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        model(x, return_loss=True).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        model.eval()
        with torch.no_grad():
            positions = torch.arange(256, 512, device="cuda").expand(2, -1)
            model.embed(x, positions=positions)
            cache = model.new_kv_cache(2, 520, pad=torch.tensor([0, 7], device="cuda"))
            model.forward_cached(x, cache)
            model.forward_cached(x[:, :1], cache)


def test_compiled_decode_equals_eager_decode():
    model = model_on("cuda").eval()
    prompts = [torch.randint(1, 256, (n,)) for n in (5, 17, 9)]
    cfg = SamplingConfig(max_new_tokens=40, temperature=0)
    eager = generate(model, prompts, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would be a failure here
        compiled = generate(model, prompts, cfg, compile=True)
    assert torch.equal(compiled.tokens, eager.tokens)
    torch.testing.assert_close(compiled.log_probs, eager.log_probs, atol=1e-3, rtol=0)


def _torchrun(args, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "palm_rlhf", *args], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)


@two_gpus
def test_two_gpu_torchrun_pretrain_and_ppo(tmp_path):
    """`torchrun --nproc_per_node 2` of the CLI on 2 GPUs (NCCL): a tiny pretrain, then PPO from its
    final/ with a reward function; each run finishes with its final checkpoint."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 400)
    run = _torchrun(["pretrain", "model.dim=64", "model.depth=2", "model.heads=2", "model.dim_head=32",
                     "seq_len=64", "batch_size=4", "max_steps=3", "progress=false", "device=cuda",
                     f"data.sources=[{corpus}]", f"out_dir={tmp_path / 'pre'}"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "pre" / "final" / "model.safetensors").is_file()
    (tmp_path / "gpu_rewards.py").write_text("def length(prompts, completions):\n"
                                              "    return [len(c) / 8 for c in completions]\n")
    (tmp_path / "prompts.txt").write_text("".join(f"{w} and\n" for w in ["the", "cat", "sat", "on"]))
    run = _torchrun(["ppo", f"model={tmp_path / 'pre' / 'final'}", f"prompts={tmp_path / 'prompts.txt'}",
                     "reward_fn=gpu_rewards:length", "max_steps=2", "prompts_per_step=4", "rollout_batch_size=2",
                     "batch_size=4", "max_new_tokens=8", "sample_every=0", "progress=false", "device=cuda",
                     f"out_dir={tmp_path / 'ppo'}"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    final = tmp_path / "ppo" / "final"  # the base with the actor merged, and the actor's adapter alone
    assert (final / "model.safetensors").is_file() and (final / "adapter.safetensors").is_file()
    assert len((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()) >= 2  # both steps logged


@torch.no_grad()
@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
def test_family_checkpoint_on_cuda_matches_transformers(tmp_path, case):
    """A Llama-family checkpoint loaded onto CUDA: fp32 logits within 1e-4 of transformers' (on the
    CPU, same weights) over 300 tokens, cached decoding equal to the full forward, and greedy
    generation equal on both devices."""
    pytest.importorskip("transformers")
    from tests.helpers.families import make_hf_checkpoint

    ref = make_hf_checkpoint(case, tmp_path)
    model = PaLM.from_pretrained(tmp_path, map_location="cuda").eval()
    x = torch.randint(0, ref.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1))
    expected = ref(x).logits
    got = model(x.cuda()).cpu()
    assert (got - expected).abs().max().item() < 1e-4
    cache = model.new_kv_cache(2, 300)
    steps = [model.forward_cached(x[:, :100].cuda(), cache, last_only=False)]
    steps += [model.forward_cached(x[:, t:t + 1].cuda(), cache, last_only=False) for t in range(100, 300)]
    torch.testing.assert_close(torch.cat(steps, 1).cpu(), expected, atol=1e-4, rtol=1e-4)
    prompts = [x[0, :7], x[1, :12]]
    config = SamplingConfig(max_new_tokens=16, temperature=0.0)
    on_cpu = generate(PaLM.from_pretrained(tmp_path).eval(), prompts, config)
    on_cuda = generate(model, [p.cuda() for p in prompts], config)
    assert torch.equal(on_cpu.tokens, on_cuda.tokens.cpu())


def _serve_greedy_rows(model):
    """The serving engine over `model` (on its device): 8 prompts submitted at once to a batch of 4,
    rows joining and leaving; returns each row's text and the text `generate` gives its prompt alone."""
    from palm_rlhf.data.tokenizer import ByteTokenizer
    from palm_rlhf.serving import Engine, Params

    tok = ByteTokenizer()
    prompts = [tok.encode("abcdefghijklmnopqrstuvwxyz"[: 1 + 3 * i]) for i in range(8)]
    max_tokens = [3 + (5 * i) % 7 for i in range(8)]
    events = [[] for _ in prompts]
    engine = Engine(model, tok, context=64, max_batch=4, gather_s=0.0).start()
    try:
        requests = [engine.submit(p, Params(max_tokens=m, temperature=0, stop_at_eos=False), 1, events[i].append)
                    for i, (p, m) in enumerate(zip(prompts, max_tokens))]
        deadline = time.monotonic() + 120
        while not all(e and e[-1].finish_reason for e in events) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert len(requests) == len(prompts)
    served = ["".join(d.text for d in e) for e in events]
    alone = [tok.decode(generate(model, [torch.tensor(p, device=model.device)],
                                 SamplingConfig(max_new_tokens=m, temperature=0)).sequences()[0])
             for p, m in zip(prompts, max_tokens)]
    return served, alone


@torch.no_grad()
def test_serving_engine_on_cuda_equals_generate():
    """`palm-rlhf serve`'s engine on a CUDA model (the plain decoder, the model's own forward): rows
    joining and leaving a running batch give the greedy text `generate` gives each prompt alone."""
    served, alone = _serve_greedy_rows(model_on("cuda").eval())
    assert served == alone
