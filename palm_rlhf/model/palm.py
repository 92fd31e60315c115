"""PaLM: the seed's public surface, routed to small dedicated methods.

`PaLM(**seed_kwargs)` takes the seed's constructor arguments with the seed's
defaults, and its parameter/buffer names match, so a seed `state_dict` loads
with `strict=True`. Each `forward` flag routes to a method:

    forward(x)                                  -> logits(x)
    forward(x, return_loss=True)                -> loss(x)
    forward(x, return_only_embedding=True)      -> embed(x)
    forward(x, return_logits_with_embedding=True) -> logits_and_embeds(x)

The same class is the one decoder of the Llama family (block="sequential", see its
constructor and `palm_rlhf.model.families`). LoRA scopes live in `scopes.py`, input checks in
`checks.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..ops import eval_mode, gumbel_sample, top_k
from .checks import InputChecks, check_config, check_family
from .kv_cache import KVCache
from .layers import LayerNorm, ParallelTransformerBlock, Residual, RMSNorm, RotaryEmbedding
from .lora import DEFAULT_LORA_TARGETS
from .scopes import FinetuneScopes
from .sequential import SequentialBlock


class PaLM(FinetuneScopes, InputChecks, nn.Module):
    # which decode engine `palm_rlhf.generation` runs: "auto", "plain" or "cpu" (palm_rlhf/backends)
    backend: str = "auto"

    def __init__(self, *, dim, num_tokens, depth, causal=True, dim_head=64, heads=8, ff_mult=4,
                 attn_dropout=0.0, ff_dropout=0.0, qk_rmsnorm=False, lora_r=8, rotary_xpos_scale_base=512,
                 flash_attn=False, finetune_scopes=tuple(), cross_entropy_ignore_index=0,
                 block="parallel", kv_heads=1, ff_inner=None, norm_eps=1e-6, tie_embeddings=True, qkv_bias=False,
                 o_bias=False, mlp_bias=False, qk_norm=False, rope_theta=10000.0, rope_scaling=None,
                 sliding_window=None, family=None, hf_config=None):
        """The seed's arguments build PaLM. The rest configure the same decoder as a Llama-family
        model (`palm_rlhf.model.families` writes them from a checkpoint's config.json):
        block "sequential" (pre-norm attention then feedforward, RMSNorm with `norm_eps`),
        `kv_heads` grouped-query heads, `ff_inner` the feedforward width (default dim * ff_mult),
        untied embeddings, q/k/v, output and MLP biases, Qwen3's per-head q/k RMSNorm, the rotary
        base and `rope_scaling`, Mistral's `sliding_window`; `family` and `hf_config` (the
        checkpoint's own config) are kept for `export`."""
        super().__init__()
        check_config(dim, num_tokens, depth, dim_head, heads, ff_mult, attn_dropout, ff_dropout, lora_r,
                      rotary_xpos_scale_base)
        check_family(block, heads, kv_heads, causal, ff_inner, sliding_window)
        self.dim, self.dim_head, self.heads, self.causal, self.num_tokens = dim, dim_head, heads, causal, num_tokens
        self.flash_attn, self.block, self.kv_heads, self.family = flash_attn, block, kv_heads, family
        self.sliding_window = sliding_window
        # everything needed to rebuild this model (written to config.json)
        self.config = dict(dim=dim, num_tokens=num_tokens, depth=depth, causal=causal, dim_head=dim_head,
                           heads=heads, ff_mult=ff_mult, attn_dropout=attn_dropout, ff_dropout=ff_dropout,
                           qk_rmsnorm=qk_rmsnorm, lora_r=lora_r, rotary_xpos_scale_base=rotary_xpos_scale_base,
                           flash_attn=flash_attn, cross_entropy_ignore_index=cross_entropy_ignore_index)
        self.token_emb = nn.Embedding(num_tokens, dim)
        if block == "parallel":
            self.layers = nn.ModuleList([
                Residual(ParallelTransformerBlock(
                    dim=dim, causal=causal, dim_head=dim_head, heads=heads, qk_rmsnorm=qk_rmsnorm, ff_mult=ff_mult,
                    attn_dropout=attn_dropout, ff_dropout=ff_dropout, xpos_scale_base=rotary_xpos_scale_base,
                    flash_attn=flash_attn))
                for _ in range(depth)
            ])
            self.norm = LayerNorm(dim)
        else:
            ff_inner = ff_inner or dim * ff_mult
            self.config.update(block=block, kv_heads=kv_heads, ff_inner=ff_inner, norm_eps=norm_eps,
                               tie_embeddings=tie_embeddings, qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
                               qk_norm=qk_norm, rope_theta=rope_theta, rope_scaling=rope_scaling,
                               sliding_window=sliding_window, family=family, hf_config=hf_config)
            self.layers = nn.ModuleList([
                SequentialBlock(dim, heads, kv_heads, dim_head, ff_inner, eps=norm_eps, qkv_bias=qkv_bias,
                                o_bias=o_bias, mlp_bias=mlp_bias, qk_norm=qk_norm, attn_dropout=attn_dropout,
                                ff_dropout=ff_dropout)
                for _ in range(depth)
            ])
            self.norm = RMSNorm(dim, norm_eps)
            self.rotary_emb = RotaryEmbedding(dim_head, use_xpos=False, theta=rope_theta, scaling=rope_scaling,
                                              persistent=False)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)
        self.tie_embeddings = tie_embeddings
        if tie_embeddings:
            self.to_logits.weight = self.token_emb.weight  # tied embeddings
        else:
            nn.init.normal_(self.to_logits.weight, std=0.02)
        nn.init.normal_(self.token_emb.weight, std=0.02)

        self.lora_r = lora_r
        self.lora_alpha: float | None = None  # alpha of new scopes; None: the seed's LoRA (see model/lora.py)
        self.lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS  # targets of new scopes
        self.finetune_modules = nn.ModuleDict({})
        self.finetune_scope_ranks: dict[str, int] = {}
        self.finetune_scope_alphas: dict[str, float] = {}  # saved with the scope: output scale alpha / r
        self.finetune_scope_targets: dict[str, tuple[str, ...]] = {}
        for scope in finetune_scopes:
            self.add_finetune_params(scope)
        self.cross_entropy_ignore_index = cross_entropy_ignore_index

    @property
    def rotary(self) -> RotaryEmbedding:
        """The rotary embedding every block uses (PaLM keeps it in each block, under the seed's names)."""
        return self.layers[0].fn.rotary_emb if self.block == "parallel" else self.rotary_emb

    # ------------------------------------------------------------------ seed utilities

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def load(self, path) -> "PaLM":
        """Load weights from `.safetensors` or a `.pt` state dict (read with weights_only=True)."""
        from .checkpoint import load_into
        from ..files import load_state_dict_file

        load_into(self, load_state_dict_file(Path(path)), source=str(path))
        return self

    def save_pretrained(self, directory) -> Path:
        """Write `config.json` + `model.safetensors` into `directory` (atomically)."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu", dtype=None, **overrides) -> "PaLM":
        """Our save_pretrained directory or a Llama/Mistral/Qwen2/Qwen3 checkpoint directory
        (see `palm_rlhf.model.families`); `dtype` "fp32" / "bf16" or a torch dtype."""
        from .checkpoint import from_pretrained

        return from_pretrained(cls, directory, map_location=map_location, dtype=dtype, **overrides)

    def set_dropout(self, dropout: float) -> "PaLM":
        for module in self.layers.modules():
            if isinstance(module, nn.Dropout):
                module.p = dropout  # attention's too: the blocks pass attn_dropout.p to SDPA
            if isinstance(module, SequentialBlock):
                module.attn_dropout = dropout
        return self

    # ------------------------------------------------------------------ forward paths

    def _forward_hidden(self, x: Tensor, finetune_scope=None, disable_lora=False, extra_embed=None,
                        kv_cache=None, positions: Tensor | None = None) -> Tensor:
        """Token ids (b, n) -> final normed embeddings (b, n, dim). No input checks.

        kv_cache: a `KVCache` (or its `at(slot)` view); x's keys and values are appended.
        positions (b, T): only the embeddings at these positions of each row, (b, T, dim);
        the last block computes its queries and feedforward there only.
        """
        b, n = x.shape
        mask, is_causal = None, self.causal and kv_cache is None
        if not self.causal:
            keep = x >= 0  # (b, n) negative ids are padding; a row that is all padding
            keep = keep | ~keep.any(-1, keepdim=True)  # attends to everything, as with the seed's -max fill
            mask, x = keep[:, None, None, :], x.masked_fill(x < 0, 0)  # (b, 1, 1, n)
        h = self.token_emb(x)  # (b, n, dim)
        if extra_embed is not None:
            h = h + extra_embed
        device_type = h.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
        if kv_cache is not None:
            slots, center, mask = kv_cache.positions(n), kv_cache.center, kv_cache.attention_mask(n)  # (b, n)
        else:
            self.check_window(n)
            slots, center = torch.arange(n, device=x.device), n // 2  # the seed's centre
        q_cos, q_sin, k_cos, k_sin = self.rotary.tables(slots, center, dtype)  # (.., n, d)
        rotary = (q_cos.unsqueeze(-3), q_sin.unsqueeze(-3), k_cos, k_sin)  # query tables broadcast over heads

        loras = self.lora_layers(finetune_scope, disable_lora)
        for i, (layer, lora) in enumerate(zip(self.layers, loras)):
            kwargs = dict(rotary=rotary, mask=mask, is_causal=is_causal, lora=lora, kv_cache=kv_cache, layer_index=i)
            if positions is not None and i == len(self.layers) - 1:  # the last block at `positions` only
                kwargs["rotary"] = (q_cos[positions][:, None], q_sin[positions][:, None], k_cos, k_sin)
                if self.causal:  # (b, 1, T, n): keys up to each query
                    kwargs["mask"] = (torch.arange(n, device=x.device) <= positions[..., None])[:, None]
                    kwargs["is_causal"] = False
                kwargs["index"] = positions
            h = layer(h, **kwargs)
        if kv_cache is not None:
            kv_cache.advance(n)
        return self.norm(h)

    def hidden_states(self, tokens: Tensor, positions: Tensor | None = None, finetune_scope: str | None = None, *,
                      disable_lora: bool = False, extra_embed: Tensor | None = None) -> Tensor:
        """Final-layer embeddings (b, n, dim) of token ids (b, n), checked.

        positions (b, T) integer: only the embeddings at these positions of each row,
        (b, T, dim), equal to the full result gathered there, with less work in the last block.
        """
        self._check_tokens(tokens)
        self._check_extra_embed(extra_embed, tokens)
        if positions is not None:
            if positions.dtype not in (torch.int32, torch.int64) or positions.ndim != 2 \
                    or positions.shape[0] != tokens.shape[0]:
                raise InputError(f"positions must be an integer (b, T) tensor with b = {tokens.shape[0]}; got "
                                 f"{positions.dtype} {tuple(positions.shape)}")
            if bool(((positions < 0) | (positions >= tokens.shape[1])).any()):  # one host sync, not two
                raise InputError(f"positions must lie in [0, {tokens.shape[1]}) for sequences of "
                                 f"{tokens.shape[1]} tokens")
            positions = positions.long()
        return self._forward_hidden(tokens, finetune_scope, disable_lora, extra_embed, positions=positions)

    def embed(self, x: Tensor, *, finetune_scope=None, disable_lora=False, extra_embed=None,
              positions: Tensor | None = None) -> Tensor:
        """The seed's `return_only_embedding`: `hidden_states`."""
        return self.hidden_states(x, positions, finetune_scope, disable_lora=disable_lora, extra_embed=extra_embed)

    def logits_and_embeds(self, x: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        embeds = self.embed(x, **kwargs)
        return self.to_logits(embeds), embeds

    def logits(self, x: Tensor, **kwargs) -> Tensor:
        return self.to_logits(self.embed(x, **kwargs))

    def loss(self, x: Tensor, *, finetune_scope=None, disable_lora=False, extra_embed=None) -> Tensor:
        """Next-token cross entropy of x[:, 1:] given x[:, :-1]; labels equal to
        `cross_entropy_ignore_index` are ignored (the seed's default is 0)."""
        self._check_tokens(x, min_len=2)
        inputs, labels = x[:, :-1], x[:, 1:]
        if extra_embed is not None and extra_embed.ndim == 3 and extra_embed.shape[1] == x.shape[1]:
            extra_embed = extra_embed[:, :-1]
        self._check_extra_embed(extra_embed, inputs)
        logits = self.to_logits(self._forward_hidden(inputs, finetune_scope, disable_lora, extra_embed))
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=self.cross_entropy_ignore_index)

    def forward(self, x, return_loss=False, disable_lora=False, finetune_scope=None, extra_embed=None,
                return_only_embedding=False, return_logits_with_embedding=False, positions=None):
        """positions (b, T) (not the seed's): the outputs at these positions of each row only (`hidden_states`)."""
        kwargs = dict(finetune_scope=finetune_scope, disable_lora=disable_lora, extra_embed=extra_embed)
        if return_loss:
            if positions is not None:
                raise InputError("positions= selects outputs; return_loss=True scores every position")
            return self.loss(x, **kwargs)
        kwargs["positions"] = positions
        if return_only_embedding:
            return self.embed(x, **kwargs)
        if return_logits_with_embedding:
            return self.logits_and_embeds(x, **kwargs)
        return self.logits(x, **kwargs)

    # ------------------------------------------------------------------ cached decoding

    def check_window(self, length: int) -> None:
        """InputError for a context longer than a sliding-window model's window (Mistral): beyond it,
        each token attends only to the last `sliding_window` ones, which this decoder does not do."""
        if self.sliding_window is not None and length > self.sliding_window:
            raise InputError(f"a context of {length} tokens is longer than this model's sliding window "
                             f"({self.sliding_window}); palm-rlhf runs sliding-window models only within the window: "
                             f"use at most {self.sliding_window} tokens (prompt + new tokens)")

    def new_kv_cache(self, batch: int, max_len: int, pad: Tensor | None = None, dtype=None) -> KVCache:
        """A cache for `batch` rows of up to `max_len` tokens: (depth, b, max_len, kv_heads * dim_head)."""
        self.check_window(max_len)
        param = self.token_emb.weight
        return KVCache(len(self.layers), batch, max_len, self.kv_heads * self.dim_head, device=param.device,
                       dtype=dtype or param.dtype, pad=pad)

    def forward_cached(self, x: Tensor, kv_cache: KVCache, *, finetune_scope=None, disable_lora=False,
                       last_only: bool = True, at: Tensor | None = None) -> Tensor:
        """Run new tokens x (b, n) against `kv_cache` and append them to it.

        Returns logits of the last position (b, V) when `last_only`, else (b, n, V); with `at`
        (indices into n) those positions' only (b, len(at), V), as a packed prefill needs.
        Used by `palm_rlhf.generation` for prefill (n = prompt length) and decode (n = 1).
        """
        if not self.causal:
            raise InputError("KV-cached decoding needs a causal PaLM (causal=True)")
        h = self._forward_hidden(x, finetune_scope, disable_lora, kv_cache=kv_cache)
        if at is not None:
            h = h[:, at]
        elif last_only:
            h = h[:, -1]
        return self.to_logits(h)

    # ------------------------------------------------------------------ seed-compatible generation

    @torch.no_grad()
    def generate(self, seq_len, prompt=None, temperature=1.0, filter_logits_fn=top_k, filter_thres=0.9,
                 pad_value=0.0, eos_token=None, return_seq_without_prompt=True, use_tqdm=False, **forward_kwargs):
        """The seed's `generate`, KV-cached: sample until the sequence is `seq_len` tokens long
        *including* the prompt (at least one new token), with the seed's legacy filters
        (`filter_logits_fn(logits, thres=filter_thres)`). Unlike the seed, each row is padded with
        `pad_value` after its own `eos_token`, and only generated tokens count as EOS. For batching,
        log-probs, stop sequences and streaming use `palm_rlhf.generation`."""
        unknown = set(forward_kwargs) - {"finetune_scope", "disable_lora"}
        if unknown:
            raise InputError(f"generate() got unsupported keyword(s) {sorted(unknown)}; "
                             f"only finetune_scope and disable_lora are passed to the model")
        scope = dict(finetune_scope=forward_kwargs.get("finetune_scope"),
                     disable_lora=forward_kwargs.get("disable_lora", False))
        if prompt is None:
            prompt = torch.randint(0, self.num_tokens, (1, 1), device=self.device)
            return_seq_without_prompt = False
        if not isinstance(prompt, Tensor) or prompt.ndim == 0:
            raise InputError("prompt must be a tensor of token ids of shape (n,) or (batch, n)")
        lead = prompt.shape[:-1]
        prompt = prompt.reshape(-1, prompt.shape[-1])  # (b, n): any leading dims, as the seed's pack
        self._check_tokens(prompt)
        b, n = prompt.shape
        steps = max(1, seq_len - n)
        out = torch.cat([prompt, prompt.new_zeros(b, steps)], dim=-1)  # (b, n + steps) preallocated
        done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
        end = n
        with eval_mode(self):
            # a bidirectional model has no KV cache: recompute the prefix every step, as the seed does
            cache = self.new_kv_cache(b, n + steps - 1) if self.causal else None
            logits = self.forward_cached(prompt, cache, **scope) if cache is not None else None
            iterator = range(steps)
            if use_tqdm:
                from tqdm.auto import tqdm  # a core dependency; only imported when asked for

                iterator = tqdm(iterator)
            for t in iterator:
                if cache is None:
                    logits = self.logits(out[:, :end], **scope)[:, -1]
                if filter_logits_fn is not None:
                    logits = filter_logits_fn(logits, thres=filter_thres)
                sample = gumbel_sample(logits, temperature=temperature).masked_fill(done, int(pad_value))  # (b,)
                out[:, end] = sample
                end += 1
                if eos_token is not None:
                    done = done | (sample == eos_token)
                    if bool(done.all()):
                        break
                if cache is not None and t < steps - 1:
                    logits = self.forward_cached(sample[:, None], cache, **scope)
        out = out[:, :end].reshape(*lead, end)
        return out[..., n:] if return_seq_without_prompt else out

    # ------------------------------------------------------------------ sizes

    def num_parameters(self, include_lora: bool = False) -> int:
        params = self.parameters() if include_lora else self.palm_parameters()
        return sum(p.numel() for p in params)
