"""The building blocks of PaLM (Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311).

Module and parameter names follow the seed package exactly so that its
state dicts load with ``strict=True``: ``layers.{i}.fn.norm.gamma``,
``layers.{i}.fn.fused_attn_ff_proj.weight``, ``layers.{i}.fn.ff_out.2.weight``, ...

Shapes: b batch, h query heads, m query positions, n input positions, j key
slots, d head dim. Multi-query attention (Shazeer 2019,
https://arxiv.org/abs/1911.02150): one key/value head shared by all query
heads, so K and V are (b, j, d).
"""

from __future__ import annotations

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
    """Rotary embeddings (Su et al., https://arxiv.org/abs/2104.09864) with xpos
    decay (Sun et al., https://arxiv.org/abs/2212.10554).

    xpos scales queries by s**((i - c) / base) and keys by s**(-(j - c) / base),
    so a query-key product is scaled by s**((i - j) / base): the centre `c`
    cancels. The seed centres on the current length (c = n // 2); a KV cache
    instead fixes c once per cache (c = max_len // 2), so cached and uncached
    attention agree while the exponents stay within +-max_len / (2 * base),
    which keeps the factors far from fp32/bf16 underflow. The tables are always
    built in fp32 and cast to the activations' dtype afterwards.
    """

    def __init__(self, dim: int, scale_base: float = 512, use_xpos: bool = True):
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)
        self.use_xpos = use_xpos
        self.scale_base = scale_base
        scale = (torch.arange(0, dim, 2) + 0.4 * dim) / (1.4 * dim)
        self.register_buffer("scale", scale)

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
    """The one place that picks the attention kernel: q (b, h, m, d), k and v (b, j, d)
    -> (b, h, m, d), with the scale 1/sqrt(d) (the seed's, qk_rmsnorm included).

    mask: bool, broadcastable to (b, h, m, j), True = attend; is_causal: query i sees keys
    <= i (m == j). `F.scaled_dot_product_attention` on every device: flash or memory-efficient
    kernels on CUDA, the flash kernel on CPU, so neither the forward nor the saved state for
    backward is O(m * j) (dropout > 0 falls back to SDPA's math kernel, which is).
    """
    b, h = q.shape[:2]
    k = k[:, None].expand(b, h, -1, -1)  # (b, h, j, d) views: the one key head serves every query head
    v = v[:, None].expand(b, h, -1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)


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
        mask / is_causal: as `attention`. lora: a finetune scope's (q, k, v, out) LoRAs.
        kv_cache: this block's keys and values are appended, and every cached slot attended.
        index (b, m): queries (and everything after attention) only at these positions of x;
        keys and values still cover all n (RL scores only a prompt's response).
        """
        b, n, _ = x.shape
        x = self.norm(x)
        xq = x if index is None else gather_rows(x, index)  # (b, m, dim)
        (w_q, w_kv, w_ff), w_out = self.projection_weights(), self.attn_out.weight
        if lora is not None and merge_lora(lora[0]):  # W + (A B)^T: one product instead of two thin ones
            lora_q, lora_k, lora_v, lora_o = lora
            w_q, w_out = w_q + lora_q.weight.t(), w_out + lora_o.weight.t()
            w_kv, lora = w_kv + torch.cat([lora_k.weight, lora_v.weight], dim=1).t(), None
        q = F.linear(xq, w_q)  # (b, m, h * d)
        k, v = F.linear(x, w_kv).chunk(2, dim=-1)  # (b, n, d) each
        if lora is not None:
            lora_q, lora_k, lora_v, lora_o = lora
            q, k, v = q + lora_q(xq), k + lora_k(x), v + lora_v(x)
        q = q.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)  # (b, h, m, d)
        if self.qk_rmsnorm:
            q, k = F.normalize(q, dim=-1) * self.q_scale, F.normalize(k, dim=-1) * self.k_scale
        q_cos, q_sin, k_cos, k_sin = rotary
        q, k = apply_rotary_tables(q, q_cos, q_sin), apply_rotary_tables(k, k_cos, k_sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_index, k, v)  # (b, j, d): every slot so far
        dropout = self.attn_dropout.p if self.training else 0.0
        out = attention(q, k, v, mask, is_causal, dropout).transpose(1, 2).flatten(2)  # (b, m, h * d)
        attn_out = F.linear(out, w_out)
        if lora is not None:
            attn_out = attn_out + lora_o(out)
        return attn_out + self.ff_out(F.linear(xq, w_ff))

    def projection_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """Views of the fused projection's weight: queries (h*d, dim), keys + values (2d, dim),
        feedforward input + gate (2 * ff_inner, dim)."""
        q_dim, d = self.fused_dims[0], self.dim_head
        return self.fused_attn_ff_proj.weight.split((q_dim, 2 * d, 2 * self.ff_inner), dim=0)

    def output_weights(self) -> tuple[Tensor, Tensor]:
        """The attention output (dim, h*d) and feedforward output (dim, ff_inner) weights."""
        return self.attn_out.weight, self.ff_out[2].weight
