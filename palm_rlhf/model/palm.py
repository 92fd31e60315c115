"""PaLM: the seed's public surface, routed to small dedicated methods.

`PaLM(**seed_kwargs)` takes the seed's constructor arguments with the seed's
defaults, and its parameter/buffer names match, so a seed `state_dict` loads
with `strict=True`. Each `forward` flag routes to a method:

    forward(x)                                  -> logits(x)
    forward(x, return_loss=True)                -> loss(x)
    forward(x, return_only_embedding=True)      -> embed(x)
    forward(x, return_logits_with_embedding=True) -> logits_and_embeds(x)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..ops import eval_mode, gumbel_sample, top_k
from .kv_cache import KVCache
from .layers import LayerNorm, ParallelTransformerBlock, Residual
from .lora import LoRA


def _check_config(dim, num_tokens, depth, dim_head, heads, ff_mult, attn_dropout, ff_dropout, lora_r,
                  rotary_xpos_scale_base):
    for name, value in (("dim", dim), ("num_tokens", num_tokens), ("depth", depth), ("dim_head", dim_head),
                        ("heads", heads), ("ff_mult", ff_mult), ("lora_r", lora_r)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"PaLM({name}={value!r}): {name} must be a positive integer")
    if dim_head % 2:
        raise ConfigError(f"PaLM(dim_head={dim_head}): rotary embeddings need an even dim_head; use {dim_head + 1}")
    for name, value in (("attn_dropout", attn_dropout), ("ff_dropout", ff_dropout)):
        if not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"PaLM({name}={value!r}): dropout must be in [0, 1)")
    if not float(rotary_xpos_scale_base) > 0:
        raise ConfigError(f"PaLM(rotary_xpos_scale_base={rotary_xpos_scale_base!r}) must be > 0")


class PaLM(nn.Module):
    # which decode engine `palm_rlhf.generation` runs: "auto", "plain" or "cpu" (palm_rlhf/backends)
    backend: str = "auto"

    def __init__(self, *, dim, num_tokens, depth, causal=True, dim_head=64, heads=8, ff_mult=4,
                 attn_dropout=0.0, ff_dropout=0.0, qk_rmsnorm=False, lora_r=8, rotary_xpos_scale_base=512,
                 flash_attn=False, finetune_scopes=tuple(), cross_entropy_ignore_index=0):
        super().__init__()
        _check_config(dim, num_tokens, depth, dim_head, heads, ff_mult, attn_dropout, ff_dropout, lora_r,
                      rotary_xpos_scale_base)
        self.dim, self.dim_head, self.heads, self.causal, self.num_tokens = dim, dim_head, heads, causal, num_tokens
        self.flash_attn = flash_attn
        # everything needed to rebuild this model (written to config.json)
        self.config = dict(dim=dim, num_tokens=num_tokens, depth=depth, causal=causal, dim_head=dim_head,
                           heads=heads, ff_mult=ff_mult, attn_dropout=attn_dropout, ff_dropout=ff_dropout,
                           qk_rmsnorm=qk_rmsnorm, lora_r=lora_r, rotary_xpos_scale_base=rotary_xpos_scale_base,
                           flash_attn=flash_attn, cross_entropy_ignore_index=cross_entropy_ignore_index)

        self.token_emb = nn.Embedding(num_tokens, dim)
        self.layers = nn.ModuleList([
            Residual(ParallelTransformerBlock(
                dim=dim, causal=causal, dim_head=dim_head, heads=heads, qk_rmsnorm=qk_rmsnorm, ff_mult=ff_mult,
                attn_dropout=attn_dropout, ff_dropout=ff_dropout, xpos_scale_base=rotary_xpos_scale_base,
                flash_attn=flash_attn))
            for _ in range(depth)
        ])
        self.norm = LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)
        self.to_logits.weight = self.token_emb.weight  # tied embeddings
        nn.init.normal_(self.token_emb.weight, std=0.02)

        self.lora_r = lora_r
        self.lora_alpha: float | None = None  # alpha of new scopes; None: the seed's LoRA (see model/lora.py)
        self.finetune_modules = nn.ModuleDict({})
        self.finetune_scope_ranks: dict[str, int] = {}
        self.finetune_scope_alphas: dict[str, float] = {}  # saved with the scope: output scale alpha / r
        for scope in finetune_scopes:
            self.add_finetune_params(scope)
        self.cross_entropy_ignore_index = cross_entropy_ignore_index

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
    def from_pretrained(cls, directory, map_location="cpu", **overrides) -> "PaLM":
        from .checkpoint import from_pretrained

        return from_pretrained(cls, directory, map_location=map_location, **overrides)

    def set_dropout(self, dropout: float) -> "PaLM":
        for module in self.layers.modules():
            if isinstance(module, nn.Dropout):
                module.p = dropout  # attention's too: the blocks pass attn_dropout.p to SDPA
        return self

    # ------------------------------------------------------------------ LoRA finetune scopes

    def require_scope(self, scope: str) -> None:
        """ConfigError naming the scopes that exist unless `scope` is one of them."""
        if scope not in self.finetune_modules:
            existing = ", ".join(repr(s) for s in self.finetune_modules) or "none"
            raise ConfigError(f"unknown finetune scope {scope!r}; scopes that exist: {existing}. "
                              f"Create it with add_finetune_params({scope!r}).")

    def add_finetune_params(self, scope: str, lora_r: int | None = None, lora_alpha: float | None = None) -> None:
        """A new LoRA scope of rank `lora_r` (default: the model's) scaled by `lora_alpha / lora_r`
        with a bounded A (the trainers pass `DEFAULT_LORA_ALPHA`). `lora_alpha=None` (and
        `self.lora_alpha` None, the default) is the seed's LoRA: randn A, scale 1."""
        if scope in self.finetune_modules:
            existing = ", ".join(repr(s) for s in self.finetune_modules)
            raise ConfigError(f"finetune scope {scope!r} already exists (scopes: {existing}); "
                              f"pick a new name or remove_finetune_params({scope!r}) first.")
        r = self.lora_r if lora_r is None else lora_r
        alpha = self.lora_alpha if lora_alpha is None else lora_alpha
        if alpha is not None and not float(alpha) > 0:
            raise ConfigError(f"lora_alpha={lora_alpha!r}: must be > 0 (the LoRA output is scaled by alpha / r)")
        q_inner, kv_inner = self.heads * self.dim_head, self.dim_head
        param = self.token_emb.weight
        modules = nn.ModuleList([
            nn.ModuleList([LoRA(self.dim, q_inner, r, alpha), LoRA(self.dim, kv_inner, r, alpha),
                           LoRA(self.dim, kv_inner, r, alpha), LoRA(q_inner, self.dim, r, alpha)])
            for _ in self.layers
        ])
        self.finetune_modules[scope] = modules.to(device=param.device, dtype=param.dtype)
        self.finetune_scope_ranks[scope] = r
        self.finetune_scope_alphas[scope] = modules[0][0].alpha

    def remove_finetune_params(self, scope: str) -> nn.ModuleList:
        self.require_scope(scope)
        self.finetune_scope_ranks.pop(scope, None)
        self.finetune_scope_alphas.pop(scope, None)
        return self.finetune_modules.pop(scope)

    @torch.no_grad()
    def merge_finetune_params(self, scope: str) -> None:
        """Fold a scope's LoRA weights into the base weights and drop the scope."""
        modules = self.remove_finetune_params(scope)
        for layer, (lora_q, lora_k, lora_v, lora_o) in zip(self.layers, modules):
            block = layer.fn
            fused = block.fused_attn_ff_proj.weight  # (out, dim)
            qkv = torch.cat([lora_q.weight, lora_k.weight, lora_v.weight], dim=1)  # (dim, q+k+v)
            fused[: qkv.shape[1]].add_(qkv.t().to(fused.dtype))
            block.attn_out.weight.add_(lora_o.weight.t().to(fused.dtype))

    def palm_parameters(self) -> list[nn.Parameter]:
        """Base parameters, never LoRA ones (a list in a stable order; the seed returned a set)."""
        lora = {id(p) for p in self.finetune_modules.parameters()}
        return [p for p in self.parameters() if id(p) not in lora]

    def finetune_parameters(self, scope: str = "default"):
        self.require_scope(scope)
        return self.finetune_modules[scope].parameters()

    # ------------------------------------------------------------------ input checks

    def _check_tokens(self, x: Tensor, min_len: int = 1) -> None:
        if not isinstance(x, Tensor):
            raise InputError(f"token ids must be a torch.Tensor, got {type(x).__name__}")
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise InputError(f"token ids must be an integer tensor, got dtype {x.dtype}; use x.long()")
        if x.ndim != 2:
            raise InputError(f"token ids must have shape (batch, seq_len), got {tuple(x.shape)}; "
                             f"use x.unsqueeze(0) for a single sequence")
        if x.shape[-1] < min_len or x.shape[0] == 0:
            raise InputError(f"token ids of shape {tuple(x.shape)} are too short: need seq_len >= {min_len}"
                             + (" for return_loss (inputs and shifted labels)" if min_len > 1 else ""))
        lo, hi = torch.aminmax(x)
        lo, hi = int(lo), int(hi)
        low_ok = 0 if self.causal else -(2**62)
        if lo < low_ok or hi >= self.num_tokens:
            bad = lo if lo < low_ok else hi
            neg = "" if self.causal else " (negative ids mark padding in non-causal mode)"
            raise InputError(f"token id {bad} is outside [0, {self.num_tokens}){neg}; "
                             f"check the tokenizer's vocabulary against PaLM(num_tokens={self.num_tokens})")

    def _check_extra_embed(self, extra_embed: Tensor | None, x: Tensor) -> None:
        if extra_embed is None:
            return
        expected = (*x.shape, self.dim)
        try:
            torch.broadcast_shapes(tuple(extra_embed.shape), expected)
            ok = extra_embed.ndim <= 3 and extra_embed.shape[-1] == self.dim
        except RuntimeError:
            ok = False
        if not ok:
            raise InputError(f"extra_embed of shape {tuple(extra_embed.shape)} does not match the token "
                             f"embeddings {expected}; it must broadcast to (batch, seq_len, dim={self.dim})")

    # ------------------------------------------------------------------ forward paths

    def lora_layers(self, finetune_scope: str | None, disable_lora: bool = False) -> list:
        """Each layer's (q, k, v, out) LoRA modules of a scope, or None per layer when no scope applies."""
        if finetune_scope is None or disable_lora:
            return [None] * len(self.layers)
        self.require_scope(finetune_scope)
        return list(self.finetune_modules[finetune_scope])

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
            slots, center = torch.arange(n, device=x.device), n // 2  # the seed's centre
        q_cos, q_sin, k_cos, k_sin = self.layers[0].fn.rotary_emb.tables(slots, center, dtype)  # (.., n, d)
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
                return_only_embedding=False, return_logits_with_embedding=False):
        kwargs = dict(finetune_scope=finetune_scope, disable_lora=disable_lora, extra_embed=extra_embed)
        if return_loss:
            return self.loss(x, **kwargs)
        if return_only_embedding:
            return self.embed(x, **kwargs)
        if return_logits_with_embedding:
            return self.logits_and_embeds(x, **kwargs)
        return self.logits(x, **kwargs)

    # ------------------------------------------------------------------ cached decoding

    def new_kv_cache(self, batch: int, max_len: int, pad: Tensor | None = None, dtype=None) -> KVCache:
        param = self.token_emb.weight
        return KVCache(len(self.layers), batch, max_len, self.dim_head, device=param.device,
                       dtype=dtype or param.dtype, pad=pad)

    def forward_cached(self, x: Tensor, kv_cache: KVCache, *, finetune_scope=None, disable_lora=False,
                       last_only: bool = True) -> Tensor:
        """Run new tokens x (b, n) against `kv_cache` and append them to it.

        Returns logits of the last position (b, V) when `last_only`, else (b, n, V).
        Used by `palm_rlhf.generation` for prefill (n = prompt length) and decode (n = 1).
        """
        if not self.causal:
            raise InputError("KV-cached decoding needs a causal PaLM (causal=True)")
        h = self._forward_hidden(x, finetune_scope, disable_lora, kv_cache=kv_cache)
        if last_only:
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
