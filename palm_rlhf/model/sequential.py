"""The sequential pre-norm block of the Llama family (Llama, Mistral, Qwen2, Qwen3).

    h = x + Attn(RMSNorm(x));  y = h + FF(RMSNorm(h))

It is a configuration of the one decoder (`PaLM`): the same rotary tables, the same
`attend` (grouped-query attention through SDPA, the same KV cache), the same LoRA scopes.
Family differences are settings, not code paths: q/k/v (and o) biases (Qwen2, Llama's
`attention_bias`), per-head RMSNorm of queries and keys before the rotation (Qwen3),
MLP biases (Llama's `mlp_bias`).

Weights are fused where one product is cheaper than three: `qkv` holds q_proj, k_proj and
v_proj stacked (rows h*d, g*d, g*d) and `gate_up` holds up_proj then gate_proj (`SwiGLU`
splits it as PaLM's feedforward does). `palm_rlhf.model.families` maps these to and from the
checkpoint's names.
"""

from __future__ import annotations

from torch import Tensor, nn

from .layers import RMSNorm, SwiGLU, attend, gather_rows, project


class SequentialBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, dim_head: int, ff_inner: int, *, eps: float = 1e-6,
                 qkv_bias: bool = False, o_bias: bool = False, mlp_bias: bool = False, qk_norm: bool = False,
                 attn_dropout: float = 0.0, ff_dropout: float = 0.0):
        super().__init__()
        self.heads, self.kv_heads, self.dim_head, self.ff_inner = heads, kv_heads, dim_head, ff_inner
        self.qkv_sizes = (heads * dim_head, kv_heads * dim_head, kv_heads * dim_head)
        self.attn_norm = RMSNorm(dim, eps)
        self.qkv = nn.Linear(dim, sum(self.qkv_sizes), bias=qkv_bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(dim_head, eps), RMSNorm(dim_head, eps)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=o_bias)
        self.ff_norm = RMSNorm(dim, eps)
        self.gate_up = nn.Linear(dim, 2 * ff_inner, bias=mlp_bias)  # rows: up, then gate
        self.swiglu, self.ff_dropout = SwiGLU(), nn.Dropout(ff_dropout)
        self.ff_down = nn.Linear(ff_inner, dim, bias=mlp_bias)
        self.attn_dropout = attn_dropout

    def forward(self, x: Tensor, rotary, mask: Tensor | None = None, is_causal: bool = False, lora=None,
                kv_cache=None, layer_index: int = 0, index: Tensor | None = None) -> Tensor:
        """x (b, n, dim) -> the block's output (b, m, dim), residuals included; arguments as
        `ParallelTransformerBlock.forward` (index (b, m): outputs only at these positions)."""
        lora = lora or {}
        hq, hkv, d = self.heads, self.kv_heads, self.dim_head
        h = self.attn_norm(x)
        w, bias = self.qkv.weight, self.qkv.bias
        if index is None:  # one product for q, k and v
            q, k, v = project(h, w, bias, [lora.get(t) for t in "qkv"], self.qkv_sizes).split(self.qkv_sizes, -1)
        else:  # queries only where outputs are wanted; keys and values everywhere
            x = gather_rows(x, index)
            (w_q, w_kv), (b_q, b_kv) = w.split((self.qkv_sizes[0], 2 * self.qkv_sizes[1])), \
                (None, None) if bias is None else bias.split((self.qkv_sizes[0], 2 * self.qkv_sizes[1]))
            q = project(gather_rows(h, index), w_q, b_q, [lora.get("q")], self.qkv_sizes[:1])
            k, v = project(h, w_kv, b_kv, [lora.get("k"), lora.get("v")], self.qkv_sizes[1:]).chunk(2, dim=-1)
        q = q.unflatten(-1, (hq, d))  # (b, m, h, d)
        k, v = k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))  # (b, n, g, d)
        if self.qk_norm:  # Qwen3: RMSNorm over each head, before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attn_dropout if self.training else 0.0
        out = attend(q.transpose(1, 2), k, v, rotary, mask, is_causal, dropout, kv_cache, layer_index)  # (b, m, h*d)
        x = x + project(out, self.attn_out.weight, self.attn_out.bias, [lora.get("o")], [self.attn_out.out_features])
        up_gate = project(self.ff_norm(x), self.gate_up.weight, self.gate_up.bias, [lora.get("up"), lora.get("gate")],
                          [self.ff_inner, self.ff_inner])
        ff = self.ff_dropout(self.swiglu(up_gate))
        return x + project(ff, self.ff_down.weight, self.ff_down.bias, [lora.get("down")], [self.ff_down.out_features])

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection a LoRA scope can adapt."""
        dim, qd, kvd = self.qkv.in_features, self.qkv_sizes[0], self.qkv_sizes[1]
        return {"q": (dim, qd), "k": (dim, kvd), "v": (dim, kvd), "o": (qd, dim),
                "gate": (dim, self.ff_inner), "up": (dim, self.ff_inner), "down": (self.ff_inner, dim)}

