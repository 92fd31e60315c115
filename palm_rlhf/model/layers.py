"""The building blocks of PaLM (Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311).

Module and parameter names follow the seed package exactly so that its
state dicts load with ``strict=True``: ``layers.{i}.fn.norm.gamma``,
``layers.{i}.fn.fused_attn_ff_proj.weight``, ``layers.{i}.fn.ff_out.2.weight``, ...

Shapes: b batch, h query heads, n query length, j key length, d head dim.
Multi-query attention (Shazeer 2019, https://arxiv.org/abs/1911.02150): one
key/value head shared by all query heads, so K and V are (b, j, d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import linear
from .lora import LoRA  # noqa: F401  (re-exported for seed-style imports)


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
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        y = self.fn(x, **kwargs)
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

    def forward(self, seq_len: int, device=None):
        """Seed-compatible: (freqs (n, d), xpos scale (n, d) or ones(1))."""
        device = device if device is not None else self.inv_freq.device
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.float())
        freqs = torch.cat((freqs, freqs), dim=-1)
        if not self.use_xpos:
            return freqs, torch.ones(1, device=device)
        power = (t - (seq_len // 2)) / self.scale_base
        scale = self.scale.float() ** power.unsqueeze(-1)
        return freqs, torch.cat((scale, scale), dim=-1)

    def tables(self, positions: Tensor, center: float, dtype: torch.dtype):
        """Fused rotation tables for arbitrary positions.

        positions: (..., n) integer or float positions.
        Returns (q_cos, q_sin, k_cos, k_sin), each (..., n, d), already multiplied
        by the xpos scale (queries) or its inverse (keys).
        """
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
        q_cos, q_sin = cos * scale, sin * scale
        k_cos, k_sin = cos / scale, sin / scale
        return tuple(x.to(dtype) for x in (q_cos, q_sin, k_cos, k_sin))

    def folded_tables(self, n: int, device, dtype: torch.dtype) -> "FoldedRotary":
        """Tables for positions 0..n-1 centred at n // 2 (the uncached forward), with
        the attention scale 1/sqrt(d) folded into the query tables and rotate_half's
        sign folded into the sine tables, so that `rotate_folded` needs one flip, one
        multiply and one fused multiply-add per tensor."""
        q_cos, q_sin, k_cos, k_sin = self.tables(torch.arange(n, device=device), n // 2, torch.float32)
        d = q_cos.shape[-1]
        sign = torch.ones(d, device=device)
        sign[: d // 2] = -1.0
        scale = d ** -0.5
        return FoldedRotary(((q_cos * scale)[:, None].to(dtype), (q_sin * (scale * sign))[:, None].to(dtype),
                             k_cos.to(dtype), (k_sin * sign).to(dtype)))


class FoldedRotary(tuple):
    """(q_cos (n, 1, d), q_sin (n, 1, d), k_cos (n, d), k_sin (n, d)) from
    `RotaryEmbedding.folded_tables`; its type selects the blocks' fused causal path."""

    __slots__ = ()


def rotate_folded(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """t * cos + rotate_half(t) * sin, with rotate_half's sign already in `sin`:
    rotate_half(t) == swap_halves(t) * [-1.., +1..]."""
    d = t.shape[-1]
    swapped = t.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    return torch.addcmul(t * cos, swapped, sin)


def merge_lora(finetune_modules) -> bool:
    """Whether a fused causal forward adds a LoRA scope's update to the weights (W + A @ B)
    rather than applying it as two thin products per module (x @ A, then @ B).

    The thin products are a few percent of the FLOPs but run ~7x below the matmul peak
    (K or N = r), so merging wins outright without autograd: forming A @ B costs no more
    than one token's worth of work. With gradients, merging turns the thin backward
    products into a full (out, in) weight gradient, in*out / (2 r (in + out)) times the
    FLOPs at full speed; it is chosen while that ratio is at most 8 (e.g. dim 128, r 8: 4;
    dim 384: 12, thin products kept).
    """
    lora_q = finetune_modules[0]
    if not torch.is_grad_enabled() or not any(p.requires_grad for p in lora_q.parameters()):
        return True
    d_in, r = lora_q.A.shape
    d_out = lora_q.B.shape[1]
    return d_in * d_out <= 8 * 2 * r * (d_in + d_out)


def attention_blocks(n: int) -> int:
    """How many query blocks `causal_attention` splits n positions into: blocks of at least
    40 positions, at most 8. Measured (fp32, 2 threads, forward + backward of one layer's
    attention, batch 16 x 256 positions, 6 heads of 64): 1 block 43.6 ms, 2: 32.7, 4: 28.4,
    6: 28.7, 8: 30.1; 4 x 1024 positions: 1 block 227 ms, 4: 96, 8: 86."""
    return min(8, max(1, n // 40))


def causal_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, dropout: float = 0.0) -> Tensor:
    """Causal multi-query attention with position-major query heads: q (b, n * heads, d)
    (scaled), k and v (b, n, d) -> (b, n * heads, d).

    Queries are split into blocks of consecutive positions, and block [s, e) is scored
    against keys [0, e) only: the keys after a block are masked for all of it, so
    skipping them changes nothing but the work (with 4 blocks, 5/8 of the full square).
    When gradients are needed (and no dropout), `_BlockCausalAttention` differentiates
    the blocks by hand.
    """
    if dropout > 0 or not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return torch.cat(_attention_blocks_forward(q, k, v, heads, dropout)[0], dim=1)
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):  # the blocks run in autocast's dtype, as autocast would
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _BlockCausalAttention.apply(q, k, v, heads)


def _query_blocks(n: int, heads: int) -> list[tuple[slice, int]]:
    """(query rows, key count) of each block of `causal_attention`."""
    blocks = attention_blocks(n)
    bounds = [n * i // blocks for i in range(blocks + 1)]
    return [(slice(s * heads, e * heads), e) for s, e in zip(bounds[:-1], bounds[1:])]


def _attention_blocks_forward(q: Tensor, k: Tensor, v: Tensor, heads: int, dropout: float = 0.0,
                              keep_probs: bool = False) -> tuple[list[Tensor], list[Tensor]]:
    """Each query block's output (b, rows, d), and with keep_probs its attention weights."""
    b, n = k.shape[0], k.shape[1]
    bias = causal_bias(n, heads, q.device, q.dtype)  # (n * heads, n)
    outs, probs = [], []
    for rows, e in _query_blocks(n, heads):
        attn = attention_weights(bias[rows, :e].expand(b, -1, -1), q[:, rows], k[:, :e], dropout)
        outs.append(torch.bmm(attn.to(v.dtype), v[:, :e]))
        if keep_probs:
            probs.append(attn)
    return outs, probs


class _BlockCausalAttention(torch.autograd.Function):
    """`causal_attention`'s blocks with a hand-written backward. Autograd would route each
    block's query and key slices through zero-filled full-size gradients and sum them;
    here every block's gradients go straight into their rows of dq, dk and dv."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):
            outs, probs = _attention_blocks_forward(q, k, v, heads, keep_probs=True)
        ctx.heads = heads
        ctx.save_for_backward(q, k, v, *probs)
        return torch.cat(outs, dim=1)

    @staticmethod
    def backward(ctx, d_out: Tensor):
        q, k, v, *probs = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            d_out = d_out.to(v.dtype)
            dq, dk, dv = [], None, None
            # the last block sees every key: its products initialise dk and dv
            for (rows, e), attn in reversed(list(zip(_query_blocks(k.shape[1], ctx.heads), probs))):
                g = d_out[:, rows]  # (b, rows, d)
                dv_part = torch.bmm(attn.transpose(1, 2), g)  # (b, e, d)
                d_scores = torch._softmax_backward_data(torch.bmm(g, v[:, :e].transpose(1, 2)), attn, -1, attn.dtype)
                dq.append(torch.bmm(d_scores, k[:, :e]))
                dk_part = torch.bmm(d_scores.transpose(1, 2), q[:, rows])
                if dk is None:
                    dk, dv = dk_part, dv_part
                else:
                    dk[:, :e] += dk_part
                    dv[:, :e] += dv_part
            return torch.cat(dq[::-1], dim=1), dk, dv, None


def attention_weights(bias: Tensor, q: Tensor, k: Tensor, dropout: float = 0.0) -> Tensor:
    """softmax(bias + q @ k^T) (with dropout) for position-major query heads: bias (b, m, n)
    additive mask, q (b, m, d) (scaled), k (b, n, d) -> (b, m, n)."""
    attn = torch.baddbmm(bias, q, k.transpose(1, 2)).softmax(dim=-1)
    return F.dropout(attn, dropout) if dropout > 0 else attn


def attend(bias: Tensor, q: Tensor, k: Tensor, v: Tensor, dropout: float = 0.0) -> Tensor:
    """`attention_weights` @ v: v (b, n, d) -> (b, m, d)."""
    return torch.bmm(attention_weights(bias, q, k, dropout).to(v.dtype), v)


_causal_bias_cache: dict = {}


def causal_bias(n: int, heads: int, device, dtype: torch.dtype) -> Tensor:
    """Additive causal mask (n * heads, n) for queries laid out position-major
    (row i * heads + head), 0 where key j <= i and -inf after. The most recent
    shape is kept, so a training loop builds it once."""
    key = (n, heads, str(device), dtype)
    bias = _causal_bias_cache.get(key)
    if bias is None:
        future = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
        bias = torch.zeros(n, n, dtype=dtype, device=device).masked_fill(future, float("-inf"))
        bias = bias.repeat_interleave(heads, dim=0)  # (n * h, n)
        _causal_bias_cache.clear()
        _causal_bias_cache[key] = bias
    return bias


def swiglu_feedforward(x: Tensor, w_x: Tensor, w_gate: Tensor, w_out: Tensor, dropout: nn.Module) -> Tensor:
    """dropout(silu(x @ w_gate^T) * (x @ w_x^T)) @ w_out^T: x (..., dim), w_x and w_gate
    (inner, dim), w_out (dim, inner) -> (..., dim)."""
    return linear(dropout(F.silu(linear(x, w_gate)) * linear(x, w_x)), w_out)


def gather_rows(t: Tensor, positions: Tensor) -> Tensor:
    """t (b, n, d), positions (b, T) -> (b, T, d): row i's vectors at positions[i]."""
    return t.gather(1, positions[..., None].expand(-1, -1, t.shape[-1]))


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(pos: Tensor, t: Tensor, scale=1.0) -> Tensor:
    """Seed-compatible rotary application."""
    return (t * pos.cos() * scale) + (rotate_half(t) * pos.sin() * scale)


def apply_rotary_tables(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return t * cos + rotate_half(t) * sin


class Attention(nn.Module):
    """Multi-query attention kernel: q (b, h, n, d), k and v (b, j, d).

    `use_flash_attn=True` calls `F.scaled_dot_product_attention` on every device
    (CPU, CUDA, MPS); otherwise the explicit math below runs. Both use the
    scale 1/sqrt(d), as the seed does (its `qk_scale` argument is stored but
    never used; we keep that behaviour so its checkpoints give the same logits).
    """

    def __init__(self, dropout: float = 0.0, causal: bool = False, use_flash_attn: bool = False):
        super().__init__()
        self.dropout = dropout
        self.attn_dropout = nn.Dropout(dropout)
        self.causal = causal
        self.use_flash_attn = use_flash_attn
        self.register_buffer("mask", None, persistent=False)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        """mask: key padding (b, j) bool, True = attend (seed argument).
        attn_mask: full boolean mask broadcastable to (b, h, n, j), True = attend.
        is_causal: defaults to `self.causal` (only valid when n == j).
        """
        is_causal = self.causal if is_causal is None else is_causal
        if mask is not None:
            key_mask = mask[:, None, None, :]  # (b, 1, 1, j)
            attn_mask = key_mask if attn_mask is None else attn_mask & key_mask
        if attn_mask is not None and is_causal:
            n, j = q.shape[-2], k.shape[-2]
            causal = torch.ones(n, j, dtype=torch.bool, device=q.device).tril(j - n)
            attn_mask, is_causal = attn_mask & causal, False
        if self.use_flash_attn:
            return self._sdpa(q, k, v, attn_mask, is_causal)
        return self._math(q, k, v, attn_mask, is_causal)

    def _sdpa(self, q, k, v, attn_mask, is_causal):
        b, h, n, d = q.shape
        dropout_p = self.dropout if self.training else 0.0
        if n == 1 or (attn_mask is None and not is_causal):
            # every query head shares one k/v head: fold heads into the query axis
            # (b, h*n, d) and skip the (b, h, j, d) expansion entirely
            mask = None if attn_mask is None else attn_mask.expand(b, h, n, -1).reshape(b, 1, h * n, -1)
            out = F.scaled_dot_product_attention(
                q.reshape(b, 1, h * n, d), k[:, None], v[:, None], attn_mask=mask, dropout_p=dropout_p
            )
            return out.view(b, h, n, d)
        k = k[:, None].expand(b, h, -1, d)  # (b, h, j, d) view, no copy
        v = v[:, None].expand(b, h, -1, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)

    def _math(self, q, k, v, attn_mask, is_causal):
        scale = q.shape[-1] ** -0.5
        sim = torch.einsum("b h i d, b j d -> b h i j", q, k) * scale
        neg = -torch.finfo(sim.dtype).max
        if attn_mask is not None:
            sim = sim.masked_fill(~attn_mask, neg)
        if is_causal:
            n, j = sim.shape[-2:]
            causal = torch.ones(n, j, dtype=torch.bool, device=q.device).triu(j - n + 1)
            sim = sim.masked_fill(causal, neg)
        attn = self.attn_dropout(sim.softmax(dim=-1))
        return torch.einsum("b h i j, b j d -> b h i d", attn, v)


class ParallelTransformerBlock(nn.Module):
    """Attention and feedforward computed in parallel from one fused projection
    (GPT-J; PaLM section 2): y = Attn(LN(x)) + FF(LN(x)).
    """

    def __init__(self, dim, dim_head=64, causal=True, heads=8, qk_rmsnorm=False, qk_scale=8, ff_mult=4,
                 attn_dropout=0.0, ff_dropout=0.0, use_xpos=True, xpos_scale_base=512, flash_attn=False):
        super().__init__()
        self.norm = LayerNorm(dim)
        attn_inner_dim = dim_head * heads
        ff_inner_dim = dim * ff_mult
        self.fused_dims = (attn_inner_dim, dim_head, dim_head, ff_inner_dim * 2)
        self.qk_rmsnorm = qk_rmsnorm
        if qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(dim_head))
            self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.attend = Attention(causal=causal, dropout=attn_dropout, use_flash_attn=flash_attn)
        self.heads = heads
        self.scale = (dim_head**-0.5) if not qk_rmsnorm else qk_scale
        self.causal = causal
        self.rotary_emb = RotaryEmbedding(dim_head, scale_base=xpos_scale_base, use_xpos=use_xpos and causal)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.flash_attn = flash_attn
        self.attn_out = nn.Linear(attn_inner_dim, dim, bias=False)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.flash_attn_dropout = attn_dropout
        self.ff_out = nn.Sequential(SwiGLU(), nn.Dropout(ff_dropout), nn.Linear(ff_inner_dim, dim, bias=False))

    def forward(self, x: Tensor, mask: Tensor | None = None, finetune_modules=None, rotary=None, kv_cache=None,
                layer_index: int = 0, attn_mask: Tensor | None = None) -> Tensor:
        """x (b, n, dim) -> (b, n, dim), the residual branch only.

        rotary: (q_cos, q_sin, k_cos, k_sin) from `RotaryEmbedding.tables`; when
        omitted, positions 0..n-1 centred at n // 2 (the seed's convention).
        kv_cache: a `KVCache`; new keys/values are written at its current offset
        and attention runs over everything cached so far (`attn_mask` decides
        which of those slots each query may see).
        """
        if isinstance(rotary, FoldedRotary) and kv_cache is None and mask is None and attn_mask is None:
            return self._forward_causal(x, finetune_modules, rotary)
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)

        q, k, v, lora_o = self._add_lora(x, q, k, v, finetune_modules)
        q = q.view(b, n, self.heads, -1).transpose(1, 2)  # (b, h, n, d)

        if self.qk_rmsnorm:
            q = F.normalize(q, dim=-1) * self.q_scale
            k = F.normalize(k, dim=-1) * self.k_scale

        if rotary is None:
            positions = torch.arange(n, device=x.device)
            rotary = self.rotary_emb.tables(positions, n // 2, q.dtype)
        q_cos, q_sin, k_cos, k_sin = rotary
        # q tables broadcast over heads: (n, d) or (b, 1, n, d)
        q = apply_rotary_tables(q, q_cos, q_sin)
        k = apply_rotary_tables(k, k_cos.squeeze(-3) if k_cos.ndim == 4 else k_cos,
                                k_sin.squeeze(-3) if k_sin.ndim == 4 else k_sin)  # (b, n, d)

        if kv_cache is not None:
            k, v = kv_cache.update(layer_index, k, v)  # (b, j, d)
            out = self.attend(q, k, v, attn_mask=attn_mask, is_causal=False)
        else:
            out = self.attend(q, k, v, mask=mask, attn_mask=attn_mask)

        out = out.transpose(1, 2).reshape(b, n, -1)  # (b, n, h*d)
        attn_out = self.attn_out(out)
        if lora_o is not None:
            attn_out = attn_out + lora_o(out)
        return attn_out + self.ff_out(ff)

    @staticmethod
    def _add_lora(x, q, k, v, finetune_modules, x_q: Tensor | None = None):
        """Add a finetune scope's LoRA deltas to q, k, v; also return its output LoRA (or None).
        x_q: the queries' inputs when they are not x (a subset of its positions)."""
        if finetune_modules is None:
            return q, k, v, None
        lora_q, lora_k, lora_v, lora_o = finetune_modules
        return q + lora_q(x if x_q is None else x_q), k + lora_k(x), v + lora_v(x), lora_o

    def _forward_causal(self, x: Tensor, finetune_modules, rotary: FoldedRotary,
                        positions: Tensor | None = None) -> Tensor:
        """The same function as `forward` for causal attention over positions 0..n-1
        without padding (pretraining, SFT, scoring full sequences), in fewer and faster
        kernels:

        - the fused projection runs as three matmuls on views of its weight (q/k/v, the
          SwiGLU input, the gate), so every activation is contiguous and the backward
          concatenates the small weight gradient, not the (b, n, 3584)-wide activation one;
        - rotary tables carry the attention scale and rotate_half's sign;
        - the query heads are laid out position-major, (b, n * h, d), so one batched
          matmul scores every head against the single key head, with the causal mask
          added as a bias, and the attention output is already (b, n, h * d);
        - queries are scored in blocks of positions, each against the keys up to its end
          only (`causal_attention`).

        positions (b, T): compute the output only at these positions of each row ->
        (b, T, dim); keys and values still cover all n (see `PaLM._hidden`).
        """
        b, n, _ = x.shape
        h, d = self.heads, self.fused_dims[1]
        x = self.norm(x)
        ff_inner = self.fused_dims[3] // 2
        w_qkv, w_ff_x, w_gate = self.fused_attn_ff_proj.weight.split(
            (self.fused_dims[0] + 2 * d, ff_inner, ff_inner), dim=0)
        w_out = self.attn_out.weight
        if finetune_modules is not None and merge_lora(finetune_modules):
            lora_q, lora_k, lora_v, lora_o = finetune_modules
            w_qkv = w_qkv + torch.cat([lora_q.weight, lora_k.weight, lora_v.weight], dim=1).t().to(w_qkv.dtype)
            w_out = w_out + lora_o.weight.t().to(w_out.dtype)
            finetune_modules = None
        q_cos, q_sin, k_cos, k_sin = rotary
        if positions is None:
            xq = x
            q, k, v = linear(x, w_qkv).split(self.fused_dims[:3], dim=-1)
            q, k, v, lora_o = self._add_lora(x, q, k, v, finetune_modules)
        else:  # queries (and everything after attention) at `positions` only
            xq = gather_rows(x, positions)  # (b, T, dim)
            w_q, w_kv = w_qkv.split((self.fused_dims[0], 2 * d), dim=0)
            q = linear(xq, w_q)
            k, v = linear(x, w_kv).split((d, d), dim=-1)
            q, k, v, lora_o = self._add_lora(x, q, k, v, finetune_modules, x_q=xq)
            q_cos, q_sin = q_cos[positions], q_sin[positions]  # (b, T, 1, d)
        m = q.shape[1]  # query positions: n, or T
        q = q.view(b, m, h, d)
        if self.qk_rmsnorm:
            q = F.normalize(q, dim=-1) * self.q_scale
            k = F.normalize(k, dim=-1) * self.k_scale
        q = rotate_folded(q, q_cos, q_sin).view(b, m * h, d)  # scaled by 1/sqrt(d)
        k = rotate_folded(k, k_cos, k_sin)  # (b, n, d)
        dropout = self.attend.dropout if self.training else 0.0
        if positions is None:
            out = causal_attention(q, k, v, h, dropout)
        else:
            hidden = torch.arange(n, device=x.device) > positions[..., None]  # (b, T, n): keys after the query
            bias = torch.zeros(hidden.shape, dtype=q.dtype, device=x.device).masked_fill_(hidden, float("-inf"))
            out = attend(bias.repeat_interleave(h, dim=1), q, k, v, dropout)  # (b, T * h, d)
        out = out.view(b, m, h * d)
        attn_out = linear(out, w_out)
        if lora_o is not None:
            attn_out = attn_out + lora_o(out)
        _, ff_dropout, ff_proj = self.ff_out
        return attn_out + swiglu_feedforward(xq, w_ff_x, w_gate, ff_proj.weight, ff_dropout)
