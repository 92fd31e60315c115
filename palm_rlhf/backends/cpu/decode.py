"""The CPU backend's one-token decode step, written for speed.

At batch 1 a decode step is bound by streaming the weights from memory plus
per-op overhead, not arithmetic (a 12.8M-parameter PaLM needs ~26 MFLOP per
token). `Decoder.step` computes the same function as
`PaLM.forward_cached(x[:, None], cache)` with far fewer ops:

- no nn.Module calls: the weights are bound once per Decoder (on a CPU as
  copies in the layout a product with this many rows streams fastest, LoRA
  folded in; see `bind_weights` and `_layout`);
- rotary + xpos tables for every cache slot are built once, with the
  attention scale 1/sqrt(d) folded into the query tables and rotate_half's
  sign folded into the sine table; queries and the key share the fused
  projection's memory, so one `x * cos + roll(x, d/2) * sin` rotates both;
- attention is two bmm's and a softmax over the filled slots, and the
  padding mask is a precomputed additive bias (absent when nothing is padded);
- residual adds are fused into `addmm` (or added in place after a split product).

The decode step is used in eval mode only (no dropout). Tested against the plain
engine and the full forward (tests/backends/test_cpu_backend.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ...errors import InputError
from .onednn import onednn_linear, onednn_packed


# weight -> {layout key (see `_layout_key`): (stamp, layout)}: a frozen weight's layouts, kept across decoders
_LAYOUTS = WeakIdKeyDictionary()  # keyed by identity (a tensor's == is elementwise)

# the row count oneDNN packs a weight for, whatever the rows of the product: the packed format is the same,
# and a weight packed for 4 rows runs products of 1-64 rows as fast as one packed for their count (within
# noise, dev CPU), so every decoder of 3 rows or more (a server's buckets 4, 8, ... 64) shares one copy
PACK_ROWS = 4


def _layout_key(rows: int, sliced: bool) -> tuple:
    """What `Decoder._layout` of a weight depends on besides the weight: the row count only where
    one or two rows may take a sliced layout."""
    return ("few", rows) if sliced and rows <= 2 else ("many", sliced)


def base_layout(w: Tensor, rows: int, sliced: bool) -> tuple[str, Tensor]:
    """`Decoder._layout` of an (out, in) CPU weight with nothing folded in, computed once per weight,
    layout and contents, not once per decoder.

    RL builds a decoder for every rollout, and the oneDNN reorder of every projection cost ~4% of a
    GRPO step (benchmarks/README.md "Against TRL"); the frozen base weights a LoRA scope leaves
    untouched (feedforward, vocabulary projection) keep their layout. A server builds a decoder for
    each bucket of rows (1, 2, 4, ... 64): those of 3 rows or more share one copy (`PACK_ROWS`).
    Before, each bucket kept its own: serving a Qwen2.5-0.5B-sized model (1.84 GiB of weights) took
    10.84 GiB at 16 rows, now 4.28 (`benchmarks/serve_memory.py`). Only frozen weights are cached
    (requires_grad False; the server freezes its model): a trained one changes every step, and the
    fused AdamW the runtime uses updates it in place without bumping its version. A frozen weight changed in place
    (`load_state_dict`) bumps its version, a new tensor its data pointer: either rebuilds the
    layout (inference tensors, which have no version, are never cached). One layout per (weight,
    layout key) is kept while the weight lives."""
    if w.requires_grad or w.is_inference():  # see the docstring: no cache, and none left behind
        _LAYOUTS.pop(w, None)
        return Decoder._layout(w.detach().t(), rows, sliced=sliced)
    stamp = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
    key = _layout_key(rows, sliced)
    cached = _LAYOUTS.setdefault(w, {})
    hit = cached.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    layout = Decoder._layout(w.detach().t(), rows, sliced=sliced)
    cached[key] = (stamp, layout)
    return layout


class Decoder:
    gemv_copy_limit = 1 << 30  # bytes of projection weights up to which a CPU decoder keeps transposed copies

    def __init__(self, model, cache, finetune_scope=None, disable_lora: bool = False):
        block0 = model.layers[0].fn
        self.model, self.cache = model, cache
        self.heads, self.dim_head, self.dim = block0.heads, model.dim_head, model.dim
        h, d = self.heads, self.dim_head
        self.qk_dim = (h + 1) * d
        self.ff_inner = block0.ff_inner
        self.ff_start = self.qk_dim + d
        self.qk_rmsnorm = block0.qk_rmsnorm
        loras = model.lora_layers(finetune_scope, disable_lora)
        self.layers = [(layer.fn, lora) for layer, lora in zip(model.layers, loras)]
        self.bind_weights()

        weight = model.token_emb.weight
        dtype, device = weight.dtype, weight.device
        max_len = cache.max_len
        # tables per slot position 0..max_len-1, shaped (max_len, h + 1, d): h query heads then the key
        q_cos, q_sin, k_cos, k_sin = block0.rotary_emb.tables(
            torch.arange(max_len, device=device), cache.center, torch.float32)  # each (max_len, d)
        scale = d ** -0.5
        half = d // 2
        sign = torch.cat([-torch.ones(half, device=device), torch.ones(half, device=device)])
        cos = torch.cat([(q_cos * scale)[:, None].expand(-1, h, -1), k_cos[:, None]], dim=1)
        sin = torch.cat([(q_sin * scale * sign)[:, None].expand(-1, h, -1), (k_sin * sign)[:, None]], dim=1)
        self.cos, self.sin = cos.to(dtype).contiguous(), sin.to(dtype).contiguous()
        # rotate_half(x) == x.roll(half, -1) * sign (roll is the cheapest way to swap the halves)
        self.half = half

        self.slot_range = torch.arange(max_len, device=device)
        self.positions = torch.zeros(max_len, cache.batch, dtype=torch.long, device=device)
        self.bias = torch.zeros(cache.batch, 1, max_len, dtype=dtype, device=device)
        self.rebind(cache.pad)
        if self.qk_rmsnorm:
            self.qk_scale = [torch.cat([blk.q_scale.expand(h, d), blk.k_scale[None]]) for blk, _ in self.layers]

    def bind_weights(self) -> None:
        """The weights and cache-layer views used every step, bound once (saves ~70 view
        ops per step). Call again if parameters change (training, `model.to(...)`).

        Every projection is a product of a few rows with a weight matrix, which on a CPU is
        bound by how fast the weights stream from memory, and MKL streams some layouts
        much faster than others. So on a CPU, models whose projection weights fit in
        `gemv_copy_limit` bytes keep copies in the layout `_layout` picks (one pass over the
        weights per `generate` call), with a LoRA scope's update folded in (no LoRA ops per
        token); larger models and other devices use views and apply the scope's modules.
        """
        params = [p for blk, _ in self.layers for p in (*blk.projection_weights(), *blk.output_weights())]
        weight = self.model.token_emb.weight
        nbytes = sum(p.numel() * p.element_size() for p in params)
        copy = weight.device.type == "cpu" and nbytes <= self.gemv_copy_limit
        split = copy and weight.dtype == torch.float32 and torch.get_num_threads() >= 2
        rows = self.cache.batch

        def layout(w: Tensor, delta: Tensor | None = None) -> tuple[str, Tensor]:
            """(out, in) weight (+ an (in, out) LoRA delta) -> (kind, tensor) for `_project`."""
            if not copy:
                return "mm", w.t()
            if delta is None:
                return base_layout(w, rows, split)
            return self._layout(w.detach().t() + delta.detach().to(w.dtype), rows, sliced=split)

        self.weights, self.step_loras = [], []
        for blk, lora in self.layers:
            fused = torch.cat(blk.projection_weights())  # (out, in): q, k, v, feedforward input + gate
            attn_out, ff_out = blk.output_weights()
            fused_delta = out_delta = None
            if copy and lora is not None:  # fold the scope into the copies: no LoRA ops per token
                lora_q, lora_k, lora_v, lora_o = (lora.get(t) for t in "qkvo")
                fused_delta = torch.zeros_like(fused.t())
                h, d = self.heads, self.dim_head
                for lora_x, start, size in ((lora_q, 0, h * d), (lora_k, h * d, d), (lora_v, (h + 1) * d, d)):
                    if lora_x is not None:
                        fused_delta[:, start:start + size] = lora_x.weight  # (in, size)
                out_delta = None if lora_o is None else lora_o.weight
            self.weights.append((blk.norm.gamma, blk.norm.beta, layout(fused, fused_delta),
                                 layout(attn_out, out_delta), layout(ff_out)))
            self.step_loras.append(None if copy else lora)
        self.logits_weight_t = layout(self.model.to_logits.weight)
        self.kv = [(self.cache.k[i], self.cache.v[i]) for i in range(len(self.layers))]  # (b, max_len, d) each

    @staticmethod
    def _layout(w_t: Tensor, rows: int, sliced: bool = True) -> tuple[str, Tensor]:
        """An (in, out) CPU weight -> the layout a product with `rows` rows streams fastest,
        as (kind, weight copy). `sliced`: slice layouts allowed (fp32 on 2+ threads); bf16
        weights always go to oneDNN where the build has it.

        MKL's product of one or two rows with a weight runs on one thread, so those layouts
        are batches of slices, one product per slice, spread over the cores (`_project`
        combines them); from 3 rows on, oneDNN's linear with a prepacked weight is fastest.
        Development CPU, fp32, 2 threads, µs per product, weights streamed from memory
        (`benchmarks/decode_layouts.py`, benchmarks/README.md):

        | rows | weight (in x out) | one mm | 2 column slices | 4 row slices, summed | 2 column slices, (out, in) | oneDNN packed |
        | --- | --- | --- | --- | --- | --- | --- |
        | 1 | 384 x 3584 (fused projection) | 303 | 233 | **204** | 364 | 345 |
        | 1 | 384 x 384 (attention out) | 64 | 48 | **42** | 43 | 51 |
        | 1 | 1536 x 384 (feedforward out) | 251 | 175 | 145 | **104** | 117 |
        | 4 | 384 x 3584 | 627 | 488 | 514 | 534 | **246** |
        | 4 | 1536 x 384 | 244 | 149 | 141 | 163 | **114** |

        With one or two rows, a weight with in >= 2 * out streams fastest as dot products
        ((out, in) slices); others as row slices (`in` split 4 ways for one row, 2 for two)
        with the partial products summed.
        """
        k, n = w_t.shape
        few = sliced and rows <= 2
        if few and k >= 2 * n and n % 2 == 0:
            return "cols_t", w_t.t().unflatten(0, (2, -1)).contiguous()  # (2, out/2, in)
        slices = 4 if rows == 1 else 2
        if few and k % slices == 0:
            return "rows", w_t.unflatten(0, (slices, -1)).contiguous()  # (s, in/s, out)
        # without slices (one thread) oneDNN beats MKL from one row on: a config-S decode step of 2 rows
        # takes 2.2-2.6 ms against 8.0-8.5 with `mm`, of 1 row 2.9-3.0 against 3.1 (benchmarks/README.md "Serving")
        many = rows > 2 or not sliced
        packed = onednn_packed(w_t, PACK_ROWS) if many or w_t.dtype == torch.bfloat16 else None
        if packed is not None:
            return "onednn", packed
        if sliced and n % 2 == 0:
            return "cols", w_t.unflatten(1, (2, -1)).transpose(0, 1).contiguous()  # (2, in, out/2)
        return "mm", w_t.contiguous()

    @staticmethod
    def _project(x: Tensor, weight: tuple[str, Tensor], residual: Tensor | None = None) -> Tensor:
        """x (b, in) @ a weight bound by `bind_weights` (+ residual) -> (b, out)."""
        kind, w = weight
        if kind == "mm":
            return torch.mm(x, w) if residual is None else torch.addmm(residual, x, w)
        if kind == "onednn":  # weight prepacked for oneDNN
            y = onednn_linear(x, w)
            return y if residual is None else y.add_(residual)
        if kind == "rows":  # partial products over slices of `in`, summed
            y = torch.bmm(x.view(x.shape[0], w.shape[0], -1).transpose(0, 1), w).sum(0)
        else:  # one slice of the output columns per batch entry
            xs = x.expand(w.shape[0], -1, -1)
            y = torch.bmm(xs, w if kind == "cols" else w.transpose(1, 2)).transpose(0, 1).reshape(x.shape[0], -1)
        return y if residual is None else y.add_(residual)

    def rebind(self, pad: Tensor) -> None:
        """Point the padding-dependent tables at the cache's `pad` (b,), updating them
        in place so a compiled step keeps seeing the same tensors."""
        self.padded = bool((pad > 0).any())
        slots = self.slot_range
        # position of slot t in row r is t - pad[r]; pad slots are never a decode query
        self.positions.copy_((slots[:, None] - pad[None, :]).clamp(min=0))  # (max_len, b)
        hidden = slots[None, :] < pad[:, None]  # (b, max_len)
        self.bias.zero_().masked_fill_(hidden[:, None, :], float("-inf"))  # (b, 1, max_len)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row (b,), append its keys/values; return next-token logits (b, V)."""
        cache = self.cache
        slot = cache.length
        if slot >= cache.max_len:
            raise InputError(f"KV cache is full ({cache.max_len} slots); allocate a larger cache")
        logits = self._step(tokens, slot)
        cache.advance(1)
        return logits

    def _rotary(self, slot):
        if self.padded:
            pos = self.positions[slot]  # (b,)
            return self.cos.index_select(0, pos), self.sin.index_select(0, pos)  # (b, h+1, d)
        return self.cos[slot], self.sin[slot]  # (h+1, d), broadcast over rows

    def _step(self, tokens: Tensor, slot: int) -> Tensor:
        b = tokens.shape[0]
        end = slot + 1
        cos, sin = self._rotary(slot)
        bias = self.bias[:, :, :end] if self.padded else None
        x = F.embedding(tokens, self.model.token_emb.weight)  # (b, dim)
        for i, ((blk, _), lora) in enumerate(zip(self.layers, self.step_loras)):
            q, ctx_in = self._attend_inputs(i, blk, lora, x, cos, sin, slot)
            k_layer, v_layer = self.kv[i]
            k_all, v_all = k_layer[:, :end], v_layer[:, :end]  # (b, j, d)
            kt = k_all.transpose(1, 2)  # (b, d, j)
            sim = torch.bmm(q, kt) if bias is None else torch.baddbmm(bias, q, kt)  # (b, h, j)
            ctx = torch.bmm(sim.softmax(-1), v_all).view(b, -1)  # (b, h*d)
            x = self._block_out(i, lora, x, ctx, ctx_in)
        return self._logits(x)

    def _attend_inputs(self, i, blk, lora, x, cos, sin, slot):
        """Norm, fused projection, rotary; writes this slot's k/v. Returns q (b, h, d) and
        what the output half of the block needs."""
        qk, v, fused = self._qkv(i, lora, x, cos, sin)
        k_layer, v_layer = self.kv[i]
        k_layer[:, slot] = qk[:, self.heads]
        v_layer[:, slot] = v
        return qk[:, :self.heads], fused

    def _qkv(self, i, lora, x, cos, sin):
        """x (b, dim) -> rotated queries and key (b, h+1, d) (queries scaled by 1/sqrt(d)),
        values (b, d), and the fused projection (b, ...) whose feedforward part `_block_out` uses."""
        b, h, d = x.shape[0], self.heads, self.dim_head
        gamma, beta, w_fused, _, _ = self.weights[i]
        xn = F.layer_norm(x, (self.dim,), gamma, beta)
        fused = self._project(xn, w_fused)  # (b, (h+2)*d + 2*ff)
        qk = fused[:, : self.qk_dim].view(b, h + 1, d)  # (b, h+1, d): queries, then the key
        v = fused[:, self.qk_dim: self.ff_start]  # (b, d)
        if lora is not None:
            zeros = xn.new_zeros(*xn.shape[:-1], d)
            lora_q, lora_k, lora_v = (lora.get(t) for t in "qkv")
            q_delta = lora_q(xn) if lora_q is not None else xn.new_zeros(*xn.shape[:-1], h * d)
            qk = qk + torch.cat([q_delta, lora_k(xn) if lora_k is not None else zeros], dim=-1).view(b, h + 1, d)
            v = v + (lora_v(xn) if lora_v is not None else zeros)
        if self.qk_rmsnorm:
            qk = F.normalize(qk, dim=-1) * self.qk_scale[i]
        qk = torch.addcmul(qk * cos, qk.roll(self.half, -1), sin)  # rotary + xpos (+ 1/sqrt(d) on q)
        return qk, v, fused

    def prefill(self, tokens: Tensor, packed) -> Tensor:
        """Prompts packed into one row (`palm_rlhf.generation.PackedPrompts`), tokens (L,) -> each
        prompt's last-token logits (prompts, V); their keys/values are written to `packed`.

        The same function as `PaLM.forward_cached(tokens[None], packed)` at those tokens, with
        this decoder's bound weights (every layout takes any number of rows; oneDNN's runs
        fp32 products 2.4x faster than MKL's on the development CPU, benchmarks/README.md),
        attention per prompt (causal over its own tokens: sum(n_i^2) work, not (sum n_i)^2
        under a block-diagonal mask), and the final norm and logits at the last tokens only.
        """
        n, h, d = tokens.shape[0], self.heads, self.dim_head
        if packed.center != self.cache.center:
            raise ValueError(f"packed prompts use xpos centre {packed.center}, this decoder's cache "
                             f"{self.cache.center}")
        positions = packed.positions(n)[0]  # (L,)
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)  # (L, h+1, d)
        bounds = list(zip(packed.starts.tolist(), packed.ends.tolist()))
        x = F.embedding(tokens, self.model.token_emb.weight)  # (L, dim)
        for i, lora in enumerate(self.step_loras):
            qk, v, fused = self._qkv(i, lora, x, cos, sin)
            packed.update(i, qk[None, :, h], v[None])
            q, k = qk[:, :h].transpose(0, 1), qk[:, h]  # (h, L, d), (L, d)
            ctx = torch.empty_like(q)  # (h, L, d)
            for start, end in bounds:  # the scale is in the query tables already
                ctx[:, start:end] = F.scaled_dot_product_attention(
                    q[:, start:end], k[None, start:end].expand(h, -1, -1), v[None, start:end].expand(h, -1, -1),
                    is_causal=True, scale=1.0)
            x = self._block_out(i, lora, x, ctx.transpose(0, 1).reshape(n, h * d), fused)
        packed.advance(n)
        return self._logits(x[packed.last_index()])

    def _block_out(self, i, lora, x, ctx, fused):
        _, _, _, w_out_t, w_ff_t = self.weights[i]
        out = self._project(ctx, w_out_t, residual=x)  # x + attn_out(ctx)
        if lora is not None and lora.get("o") is not None:
            out = out + lora["o"](ctx)
        ff_x = fused[:, self.ff_start: self.ff_start + self.ff_inner]
        gate = fused[:, self.ff_start + self.ff_inner:]
        return self._project(F.silu(gate) * ff_x, w_ff_t, residual=out)  # + ff_out(swiglu)

    def _logits(self, x: Tensor) -> Tensor:
        norm = self.model.norm
        x = F.layer_norm(x, (self.dim,), norm.gamma, norm.beta)
        return self._project(x, self.logits_weight_t)  # (b, V)
