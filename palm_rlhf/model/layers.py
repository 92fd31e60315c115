"""The building blocks of PaLM (Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311).

Module and parameter names follow the seed package exactly so that its
state dicts load with ``strict=True``: ``layers.{i}.fn.norm.gamma``,
``layers.{i}.fn.fused_attn_ff_proj.weight``, ``layers.{i}.fn.ff_out.2.weight``, ...

Shapes: b batch, h query heads, g key/value heads, m query positions, n input
positions, j key slots, d head dim. PaLM uses multi-query attention (Shazeer 2019,
https://arxiv.org/abs/1911.02150): one key/value head shared by all query heads
(g = 1); the Llama family uses grouped-query attention (Ainslie et al. 2023,
https://arxiv.org/abs/2305.13245): g heads, each shared by h / g query heads.
Keys and values travel as (b, n, g * d), the layout the KV cache stores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm(nn.Module):
    """LayerNorm without a learned bias (PaLM).

    The gain is stored as itself (init 1), as in the seed. palm-rlhf-pytorch
    0.8.x stores it as an offset from 1; `palm_rlhf.model.convert` translates.
    `beta` is a persistent zero buffer only so the seed's key names load.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (Zhang & Sennrich 2019,
    https://arxiv.org/abs/1910.07467), the Llama family's norm: computed in fp32, then the
    gain multiplies the result cast back to the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Residual(nn.Module):
    """x + fn(x); with `index` (b, m) only at those positions of x (see the block's forward)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, index: Tensor | None = None, **kwargs) -> Tensor:
        y = self.fn(x, index=index, **kwargs)
        x = x if index is None else gather_rows(x, index)
        if not (x.requires_grad or y.requires_grad):
            return x.add_(y)  # inference: reuse the residual stream's memory
        return x + y


class SwiGLU(nn.Module):
    """SwiGLU gating (Shazeer 2020, https://arxiv.org/abs/2002.05202)."""

    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class RotaryEmbedding(nn.Module):
    """Rotary embeddings (Su et al., https://arxiv.org/abs/2104.09864), with PaLM's xpos
    decay (Sun et al., https://arxiv.org/abs/2212.10554) or a family's frequency scaling.

    xpos scales queries by s**((i - c) / base) and keys by s**(-(j - c) / base),
    so a query-key product is scaled by s**((i - j) / base): the centre `c`
    cancels. The seed centres on the current length (c = n // 2); a KV cache
    instead fixes c once per cache (c = max_len // 2), so cached and uncached
    attention agree while the exponents stay within +-max_len / (2 * base),
    which keeps the factors far from fp32/bf16 underflow. The tables are always
    built in fp32 and cast to the activations' dtype afterwards.

    `theta` is the frequency base (10,000 for PaLM; a family's `rope_theta`); `scaling` a
    family's `rope_scaling` (`rope_frequencies`). PaLM keeps its buffers in the state dict
    (the seed's names); a family's are `persistent=False`, recomputed from the config.
    """

    def __init__(self, dim: int, scale_base: float = 512, use_xpos: bool = True, theta: float = 10000.0,
                 scaling: dict | None = None, persistent: bool = True):
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(dim, theta, scaling), persistent=persistent)
        self.use_xpos = use_xpos
        self.scale_base = scale_base
        scale = (torch.arange(0, dim, 2) + 0.4 * dim) / (1.4 * dim)
        self.register_buffer("scale", scale, persistent=persistent)  # the seed keeps it even without xpos
        self.dim, self.theta, self.scaling, self.persistent = dim, theta, scaling, persistent

    def _apply(self, fn, recurse=True):
        """A family's tables are derived, not learned: after any move or cast (`.to(bf16)`,
        `to_empty` after building on the meta device) they are recomputed, in fp32."""
        super()._apply(fn, recurse)
        device = self.inv_freq.device
        if not self.persistent and device.type != "meta":
            self.inv_freq = rope_frequencies(self.dim, self.theta, self.scaling).to(device)
            self.scale = ((torch.arange(0, self.dim, 2) + 0.4 * self.dim) / (1.4 * self.dim)).to(device)
        return self

    def tables(self, positions: Tensor, center: float, dtype: torch.dtype):
        """Rotation tables for arbitrary positions (..., n) -> (q_cos, q_sin, k_cos, k_sin),
        each (..., n, d), already multiplied by the xpos scale (queries) or its inverse (keys)."""
        t = positions.to(torch.float32)
        freqs = t.unsqueeze(-1) * self.inv_freq.float()  # (..., n, d/2)
        freqs = torch.cat((freqs, freqs), dim=-1)  # (..., n, d)
        cos, sin = freqs.cos(), freqs.sin()
        if not self.use_xpos:
            cos, sin = cos.to(dtype), sin.to(dtype)
            return cos, sin, cos, sin
        power = (t - center) / self.scale_base
        scale = self.scale.float() ** power.unsqueeze(-1)
        scale = torch.cat((scale, scale), dim=-1)
        return tuple(x.to(dtype) for x in (cos * scale, sin * scale, cos / scale, sin / scale))


ROPE_TYPES = ("default", "linear", "llama3")


def rope_frequencies(dim: int, theta: float = 10000.0, scaling: dict | None = None) -> Tensor:
    """The rotary inverse frequencies (d/2,), fp32, with a family's `rope_scaling`:
    - "linear": positions divided by `factor` (Chen et al. 2023, https://arxiv.org/abs/2306.15595);
    - "llama3": Llama 3.1's rule: long wavelengths divided by `factor`, short ones kept, a smooth
      blend between `original_max_position_embeddings / high_freq_factor` and `/ low_freq_factor`.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= context / high) & (wavelen <= context / low)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_tables(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return t * cos + rotate_half(t) * sin


def gather_rows(t: Tensor, positions: Tensor) -> Tensor:
    """t (b, n, d), positions (b, T) -> (b, T, d): row i's vectors at positions[i]."""
    return t.gather(1, positions[..., None].expand(-1, -1, t.shape[-1]))


def merge_lora(lora_q) -> bool:
    """Whether a block folds a LoRA scope into its weights (W + (A B)^T) rather than applying it
    as two thin products per module (x A, then B), which run far below the matmul peak (K or N
    = r). Always without gradients; with them while the merged weight's full gradient costs at
    most 8x the thin products' FLOPs: in * out <= 8 * 2r(in + out) (dim 128, r 8: merged; dim 384:
    thin). A dim-128 PPO learning pass (LoRA, scored positions): 1.4x faster merged."""
    if not torch.is_grad_enabled() or not any(p.requires_grad for p in lora_q.parameters()):
        return True
    (d_in, r), d_out = lora_q.A.shape, lora_q.B.shape[1]
    return d_in * d_out <= 8 * 2 * r * (d_in + d_out)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, dropout: float) -> Tensor:
    """The one place that picks the attention kernel: q (b, h, m, d), k and v (b, g, j, d)
    -> (b, h, m, d), with the scale 1/sqrt(d) (the seed's, qk_rmsnorm included).

    mask: bool, broadcastable to (b, 1, m, j), True = attend; is_causal: query i sees keys
    <= i (m == j). `F.scaled_dot_product_attention` on every device: flash or memory-efficient
    kernels on CUDA, the flash kernel on CPU, so neither the forward nor the saved state for
    backward is O(m * j) (dropout > 0 falls back to SDPA's math kernel, which is).

    g key heads serve h query heads: g = 1 expands the one head (stride-0 views); with a mask
    (decode, padded prefill) the h / g query heads of a group are folded into its query rows,
    one product per key head with no copy of the keys (2x faster than SDPA's `enable_gqa` for a
    decode step on the development CPU); causal training uses `enable_gqa`.
    """
    b, h, m, d = q.shape
    g = k.shape[1]
    if g == 1:
        k, v = k.expand(b, h, -1, -1), v.expand(b, h, -1, -1)  # (b, h, j, d) views
    elif g != h and not is_causal:
        mask = None if mask is None else mask.expand(b, 1, m, -1)
        rep = h // g
        q = q.reshape(b, g, rep * m, d)  # (b, g, rep * m, d): a group's query heads, one after another
        if mask is not None:
            mask = mask if m == 1 else mask.repeat(1, 1, rep, 1)  # (b, 1, rep * m, j)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return out.view(b, h, m, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                          enable_gqa=g != h)


def attend(q: Tensor, k: Tensor, v: Tensor, rotary, mask: Tensor | None, is_causal: bool, dropout: float,
           kv_cache=None, layer_index: int = 0) -> Tensor:
    """Rotate, cache and attend: q (b, h, m, d), k and v (b, n, g, d) -> (b, m, h * d).

    rotary: (q_cos, q_sin) broadcastable to q, (k_cos, k_sin) to (b, n, d). kv_cache: k and v
    are appended as (b, n, g * d) and every cached slot is attended.
    """
    q_cos, q_sin, k_cos, k_sin = rotary
    q = apply_rotary_tables(q, q_cos, q_sin)
    k = apply_rotary_tables(k, k_cos.unsqueeze(-2), k_sin.unsqueeze(-2))  # tables broadcast over key heads
    g, d = k.shape[-2:]
    if kv_cache is not None:
        k, v = kv_cache.update(layer_index, k.flatten(2), v.flatten(2))  # (b, j, g * d): every slot so far
        k, v = k.unflatten(-1, (g, d)), v.unflatten(-1, (g, d))
    out = attention(q, k.transpose(1, 2), v.transpose(1, 2), mask, is_causal, dropout)  # (b, h, m, d)
    return out.transpose(1, 2).flatten(2)


def project(x: Tensor, weight: Tensor, bias: Tensor | None, loras, sizes) -> Tensor:
    """x @ weight.T (+ bias) with LoRA updates on slices of the output: `loras` lists one LoRA
    (or None) per slice of `sizes` (e.g. q, k, v of a fused projection). Merged into the weight
    when `merge_lora` says that is cheaper, else added as thin products."""
    active = [lora for lora in loras if lora is not None]
    if not active:
        return F.linear(x, weight, bias)
    if merge_lora(active[0]):
        delta = torch.cat([weight.new_zeros(n, weight.shape[1]) if lora is None else lora.weight.t().to(weight.dtype)
                           for lora, n in zip(loras, sizes)])  # (out, in)
        return F.linear(x, weight + delta, bias)
    y = F.linear(x, weight, bias)
    return y + torch.cat([x.new_zeros(*x.shape[:-1], n) if lora is None else lora(x) for lora, n in zip(loras, sizes)],
                         dim=-1)


class ParallelTransformerBlock(nn.Module):
    """Attention and feedforward computed in parallel from one fused projection
    (GPT-J; PaLM section 2): y = Attn(LN(x)) + FF(LN(x)).

    `flash_attn` is the seed's flag, kept and saved; attention always goes through
    `attention` (SDPA), whose memory is linear in the length either way.
    """

    def __init__(self, dim, dim_head=64, causal=True, heads=8, qk_rmsnorm=False, qk_scale=8, ff_mult=4,
                 attn_dropout=0.0, ff_dropout=0.0, use_xpos=True, xpos_scale_base=512, flash_attn=False):
        super().__init__()
        self.heads, self.dim_head, self.causal, self.flash_attn = heads, dim_head, causal, flash_attn
        self.ff_inner = dim * ff_mult
        self.fused_dims = (dim_head * heads, dim_head, dim_head, self.ff_inner * 2)  # q, k, v, ff
        self.norm = LayerNorm(dim)
        self.qk_rmsnorm = qk_rmsnorm
        if qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(dim_head))
            self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.rotary_emb = RotaryEmbedding(dim_head, scale_base=xpos_scale_base, use_xpos=use_xpos and causal)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(dim_head * heads, dim, bias=False)
        self.attn_dropout = nn.Dropout(attn_dropout)  # its p is attention's dropout probability
        self.ff_out = nn.Sequential(SwiGLU(), nn.Dropout(ff_dropout), nn.Linear(self.ff_inner, dim, bias=False))

    def forward(self, x: Tensor, rotary, mask: Tensor | None = None, is_causal: bool = False, lora=None,
                kv_cache=None, layer_index: int = 0, index: Tensor | None = None) -> Tensor:
        """x (b, n, dim) -> the residual branch (b, m, dim).

        rotary: (q_cos, q_sin) broadcastable to (b, h, m, d), (k_cos, k_sin) to (b, n, d).
        mask / is_causal: as `attention`. lora: a finetune scope's {target: LoRA} (q, k, v, o).
        kv_cache: this block's keys and values are appended, and every cached slot attended.
        index (b, m): queries (and everything after attention) only at these positions of x;
        keys and values still cover all n (RL scores only a prompt's response).
        """
        b, n, _ = x.shape
        x = self.norm(x)
        xq = x if index is None else gather_rows(x, index)  # (b, m, dim)
        (w_q, w_kv, w_ff), w_out = self.projection_weights(), self.attn_out.weight
        lora = lora or {}
        d = self.dim_head
        q = project(xq, w_q, None, [lora.get("q")], [w_q.shape[0]])  # (b, m, h * d)
        k, v = project(x, w_kv, None, [lora.get("k"), lora.get("v")], [d, d]).chunk(2, dim=-1)  # (b, n, d) each
        q = q.unflatten(-1, (self.heads, d)).transpose(1, 2)  # (b, h, m, d)
        k, v = k.unsqueeze(-2), v.unsqueeze(-2)  # (b, n, 1, d): the one key/value head
        if self.qk_rmsnorm:
            q, k = F.normalize(q, dim=-1) * self.q_scale, F.normalize(k, dim=-1) * self.k_scale
        dropout = self.attn_dropout.p if self.training else 0.0
        out = attend(q, k, v, rotary, mask, is_causal, dropout, kv_cache, layer_index)  # (b, m, h * d)
        attn_out = project(out, w_out, None, [lora.get("o")], [w_out.shape[0]])
        return attn_out + self.ff_out(F.linear(xq, w_ff))

    def projection_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """Views of the fused projection's weight: queries (h*d, dim), keys + values (2d, dim),
        feedforward input + gate (2 * ff_inner, dim)."""
        q_dim, d = self.fused_dims[0], self.dim_head
        return self.fused_attn_ff_proj.weight.split((q_dim, 2 * d, 2 * self.ff_inner), dim=0)

    def output_weights(self) -> tuple[Tensor, Tensor]:
        """The attention output (dim, h*d) and feedforward output (dim, ff_inner) weights."""
        return self.attn_out.weight, self.ff_out[2].weight
