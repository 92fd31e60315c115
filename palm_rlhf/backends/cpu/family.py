"""The CPU backend's decode step for the Llama family's sequential block.

The same function as `PaLM.forward_cached(x[:, None], cache)` for a `block="sequential"`
model, with the PaLM decoder's machinery (`Decoder`): weights bound once in the layout a
product with this many rows streams fastest (`Decoder._layout`: slices spread over the cores
for one or two rows, where MKL's matrix-vector product runs on one thread; oneDNN-prepacked
from three rows), a LoRA scope folded into those copies, rotary tables per slot built once with
1/sqrt(d) folded into the query rows, and the queries and keys of a step rotated in one op.
Grouped-query attention is torch's fused attention (`enable_gqa`) over views of the cache, the
h / g query heads of a group sharing its keys. Before, two batched products over the cache permuted
to (b, g, d, j) copied it twice per layer and step: 3.2 of a 16.8 ms step of 16 rows
(`benchmarks/decode_profile.py`), where the fused kernel reads it in place (0.14 against 0.29 ms per
layer at 100 slots). Prefill goes through the model's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .decode import Decoder, base_layout


class FamilyDecoder(Decoder):
    def __init__(self, model, cache, finetune_scope=None, disable_lora: bool = False):
        self.model, self.cache = model, cache
        self.scope = dict(finetune_scope=finetune_scope, disable_lora=disable_lora)
        self.heads, self.kv_heads, self.dim_head, self.dim = model.heads, model.kv_heads, model.dim_head, model.dim
        h, g, d = self.heads, self.kv_heads, self.dim_head
        loras = model.lora_layers(finetune_scope, disable_lora)
        self.layers = [(layer, lora) for layer, lora in zip(model.layers, loras)]
        self.bind_weights()
        weight = model.token_emb.weight
        device = weight.device
        cos, sin, _, _ = model.rotary.tables(torch.arange(cache.max_len, device=device), 0, torch.float32)
        half = d // 2
        sign = torch.cat([-torch.ones(half, device=device), torch.ones(half, device=device)])
        scale = torch.cat([torch.full((h, 1), d ** -0.5, device=device), torch.ones(g, 1, device=device)])  # (h+g, 1)
        self.cos = (cos[:, None] * scale).to(weight.dtype).contiguous()  # (max_len, h + g, d)
        self.sin = (sin[:, None] * scale * sign).to(weight.dtype).contiguous()
        self.half = half
        self.slot_range = torch.arange(cache.max_len, device=device)
        self.positions = torch.zeros(cache.max_len, cache.batch, dtype=torch.long, device=device)
        self.bias = torch.zeros(cache.batch, 1, cache.max_len, dtype=weight.dtype, device=device)
        self.rebind(cache.pad)

    def bind_weights(self) -> None:
        """Every projection's weight in its fastest layout, LoRA folded in (see `Decoder.bind_weights`).

        The sliced layouts of one or two rows are a copy each of every weight, beside the oneDNN copy
        that every larger batch shares (`base_layout`): a model whose projection weights pass
        `gemv_copy_limit` bytes (1 GiB) decodes one or two rows through the oneDNN copy too (a
        Qwen2.5-0.5B-sized model would otherwise hold its weights four times when serving)."""
        weight = self.model.token_emb.weight
        rows = self.cache.batch
        copy = weight.device.type == "cpu"
        projections = [self.model.to_logits.weight] + [w for blk, _ in self.layers for w in (
            blk.qkv.weight, blk.attn_out.weight, blk.gate_up.weight, blk.ff_down.weight)]
        small = sum(w.numel() * w.element_size() for w in projections) <= self.gemv_copy_limit
        split = copy and small and weight.dtype == torch.float32 and torch.get_num_threads() >= 2

        def layout(w: Tensor, loras=(), sizes=()) -> tuple[str, Tensor]:
            w_t = w.detach().t()
            if copy and all(lora is None for lora in loras):  # a frozen weight: its layout is kept (base_layout)
                return base_layout(w, rows, split)
            if any(lora is not None for lora in loras):
                w_t = w_t + torch.cat([w.new_zeros(w.shape[1], n) if lora is None else lora.weight.detach()
                                       for lora, n in zip(loras, sizes)], dim=1).to(w.dtype)
            return self._layout(w_t, rows, sliced=split) if copy else ("mm", w_t)

        self.weights = []
        for blk, lora in self.layers:
            lora = lora or {}
            ff = blk.ff_inner
            self.weights.append((
                layout(blk.qkv.weight, [lora.get(t) for t in "qkv"], blk.qkv_sizes), blk.qkv.bias,
                layout(blk.attn_out.weight, [lora.get("o")], [self.dim]), blk.attn_out.bias,
                layout(blk.gate_up.weight, [lora.get("up"), lora.get("gate")], [ff, ff]), blk.gate_up.bias,
                layout(blk.ff_down.weight, [lora.get("down")], [self.dim]), blk.ff_down.bias))
        self.logits_weight_t = layout(self.model.to_logits.weight)
        self.kv = [(self.cache.k[i], self.cache.v[i]) for i in range(len(self.layers))]  # (b, max_len, g*d) each
        self.norms = [(self._norm(blk.attn_norm), self._norm(blk.ff_norm),
                       self._norm(blk.q_norm) if blk.qk_norm else None, self._norm(blk.k_norm) if blk.qk_norm else None)
                      for blk, _ in self.layers]
        self.final_norm = self._norm(self.model.norm)

    @staticmethod
    def _norm(m):
        """An `RMSNorm` module as one op where that is the same function (fp32 weights: the module's casts
        to fp32 and back are no-ops then; equal to the bit): 3-4% of a 16-row step on the development
        CPU, by fewer Python calls. Other dtypes keep the module."""
        if m.weight.dtype != torch.float32:
            return m
        shape, weight, eps = (m.weight.shape[0],), m.weight, m.eps
        return lambda x: torch.rms_norm(x, shape, weight, eps)

    def _linear(self, x: Tensor, weight, bias: Tensor | None, residual: Tensor | None = None) -> Tensor:
        y = self._project(x, weight, residual=residual)
        return y if bias is None else y.add_(bias)

    def _step(self, tokens: Tensor, slot: int) -> Tensor:
        b, h, g, d = tokens.shape[0], self.heads, self.kv_heads, self.dim_head
        end = slot + 1
        cos, sin = self._rotary(slot)  # (b or 1, h + g, d)
        bias = self.bias[:, None, :, :end] if self.padded else None  # (b, 1, 1, j)
        x = F.embedding(tokens, self.model.token_emb.weight)  # (b, dim)
        for weights, (k_layer, v_layer), (attn_norm, ff_norm, q_norm, k_norm) in zip(self.weights, self.kv, self.norms):
            w_qkv, b_qkv, w_o, b_o, w_gu, b_gu, w_down, b_down = weights
            qkv = self._linear(attn_norm(x), w_qkv, b_qkv)  # (b, (h + 2g) d)
            qk = qkv[:, :(h + g) * d].view(b, h + g, d)  # queries, then keys
            if q_norm is not None:
                qk = torch.cat([q_norm(qk[:, :h]), k_norm(qk[:, h:])], dim=1)
            qk = torch.addcmul(qk * cos, qk.roll(self.half, -1), sin)  # rotary (+ 1/sqrt(d) on q)
            k_layer[:, slot] = qk[:, h:].reshape(b, g * d)
            v_layer[:, slot] = qkv[:, (h + g) * d:]
            keys = k_layer[:, :end].view(b, end, g, d).transpose(1, 2)  # (b, g, j, d): views of the cache
            values = v_layer[:, :end].view(b, end, g, d).transpose(1, 2)
            ctx = F.scaled_dot_product_attention(qk[:, :h, None], keys, values, attn_mask=bias, scale=1.0,
                                                 enable_gqa=True)  # (b, h, 1, d); the scale is in the tables
            x = self._linear(ctx.reshape(b, h * d), w_o, b_o, residual=x)
            up, gate = self._linear(ff_norm(x), w_gu, b_gu).chunk(2, dim=-1)
            x = self._linear(F.silu(gate) * up, w_down, b_down, residual=x)
        return self._project(self.final_norm(x), self.logits_weight_t)  # (b, V)

    def prefill(self, tokens: Tensor, packed) -> Tensor:
        """Packed prompts through the model's own forward (see `PlainDecoder.prefill`). A prefill with
        the bound weights and attention per prompt, as `Decoder.prefill`, was tried (2026-12-07) and
        measured no faster than this on the serving benchmark's 16 prompts, within noise: oneDNN
        weights packed for few rows run 539-row products slower than MKL's."""
        return self.model.forward_cached(tokens[None], packed, at=packed.last_index(), **self.scope)[0]
