"""A decoder with a static KV cache and, on CUDA, the one-token step captured in a CUDA graph.

transformers' ``generate`` spends most of a batch-1 step in Python and in launching hundreds of small kernels; the
weights themselves (4.5 GB for an 8B model in 4 bits) take about 1.5 ms to read on an H100. This module runs the
decoder layers of a supported family (Llama, Mistral, Qwen2, Qwen3) directly:

- the model's own modules do everything but attention and the projections (embeddings, RMSNorms, rotary tables,
  activation), so the numerics are the model's;
- the KV cache is preallocated ([B, kv_heads, max_len, head_dim] per layer) and written in place at each row's
  position, so every step has the same shapes and the same tensors;
- projections of decode-sized inputs go through :func:`kbit.kernels.dispatch.gemv_4bit` (the fused 4-bit GEMV with
  the LoRA branch folded in) when the layer is a kbit ``Linear4bit`` (bare or under LoRA); anything else calls the
  module itself;
- the prompt (prefill) runs the same layers over all its tokens with the training path's kernels;
- on CUDA the step (embedding to logits) is captured once in a CUDA graph and replayed per token.

Rows of a batch are independent: each prompt is prefilled into its own cache row and keeps its own position, so a
row's tokens are the ones it would get alone (no padding in any row's attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import apply_rotary, dispatch, rms_norm, swiglu
from ..lora.layer import LoRALinear
from ..nn import Linear4bit
from ..quant import as_bytes

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
_SDPA_GQA = torch.__version__ >= "2.5"  # TorchVersion compares as a version


def unsupported_reason(model: nn.Module, length: int | None = None) -> str | None:
    """Why ``model`` cannot use this decoder for ``length`` tokens (prompt + reply), or ``None`` when it can."""
    cfg = getattr(model, "config", None)
    family = getattr(cfg, "model_type", None)
    if family not in FAMILIES:
        return f"model family {family!r} is not one of {', '.join(FAMILIES)}"
    window = _attention_window(cfg)
    if window and (length is None or length > window):  # the decoder attends to every cached position
        return f"sliding-window attention (window {window}) over {length or 'any number of'} tokens"
    rope = getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _STATIC_ROPE:
        return f"rope scaling {rope_type!r} depends on the sequence length"
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
        return "the model has no .model.layers / .model.rotary_emb"
    return None


def _attention_window(cfg) -> int | None:
    """The sliding attention window a model applies (Mistral's, or Qwen's when switched on), else None."""
    window = getattr(cfg, "sliding_window", None)
    if window and (cfg.model_type == "mistral" or getattr(cfg, "use_sliding_window", False)):
        return window
    return None


def _lora_parts(module: nn.Module):
    """(base Linear4bit, A, B, scale) when ``module`` is a plain LoRA over Linear4bit in eval mode, else None."""
    if (
        isinstance(module, LoRALinear)
        and module.enabled
        and not module.use_dora
        and isinstance(module.base_layer, Linear4bit)
    ):
        if isinstance(module.lora_dropout, nn.Identity) or not module.training:
            return module.base_layer, module.lora_A.weight, module.lora_B.weight, module.scale
    return None


def project(
    module: nn.Module, x: torch.Tensor, xa: torch.Tensor | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``module(x) (+ residual)`` for x [rows, in]; one row on CUDA (up to four on Hopper) goes through the fused
    4-bit GEMV when the module allows it, the residual added in its epilogue.

    ``xa`` is ``x A^T`` of a LoRA module when the caller already has it (one matmul for the adapters of q, k and v).
    """
    if isinstance(module, LoRALinear) and not module.enabled:
        module = module.base_layer  # adapters switched off ("base"): the base layer alone
    if x.shape[0] <= dispatch.GEMV_MAX_ROWS and x.is_cuda:
        if isinstance(module, Linear4bit) and (residual is None or residual.dtype == module.compute_dtype):
            xc = x.to(module.compute_dtype)
            if dispatch.gemv_fuses(xc, as_bytes(module.weight), module.quant_state):
                return dispatch.gemv_4bit(xc, as_bytes(module.weight), module.quant_state, module.bias,
                                          residual=residual)  # fmt: skip
        parts = _lora_parts(module)
        if parts is not None and (residual is None or residual.dtype == parts[0].compute_dtype):
            base, a, b, scale = parts
            xc = x.to(base.compute_dtype)
            if dispatch.gemv_fuses(xc, as_bytes(base.weight), base.quant_state):
                if xa is None:
                    xa = dispatch.lora_down(xc.to(a.dtype), a)  # one small launch shared by every output block
                return dispatch.gemv_4bit(xc, as_bytes(base.weight), base.quant_state, base.bias, xa, b, scale,
                                          residual)  # fmt: skip
    y = module(x)
    return y if residual is None else residual + y


class _SharedInput:
    """Projections reading one input (q/k/v, gate/up) whose LoRA A matrices are stacked for one ``x A^T`` matmul.

    The stack is a copy, refreshed in place before each decode (so a captured graph keeps reading the same storage
    and sees adapters trained or loaded since).
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        parts = [_lora_parts(m) for m in modules]
        ok = all(p is not None for p in parts) and len({p[1].dtype for p in parts}) == 1
        self.stack = torch.cat([p[1].detach() for p in parts]) if ok else None
        self.ranks = [p[1].shape[0] for p in parts] if ok else []

    def refresh(self) -> None:
        if self.stack is not None:
            torch.cat([m.lora_A.weight.detach() for m in self.modules], out=self.stack)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.stack is None or x.shape[0] > dispatch.GEMV_MAX_ROWS or not x.is_cuda:
            return [project(m, x) for m in self.modules]
        xas = dispatch.lora_down(x.to(self.stack.dtype), self.stack).split(self.ranks, dim=1)
        return [project(m, x, xa) for m, xa in zip(self.modules, xas, strict=True)]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, heads, T, D]; cos/sin [B, T, D] (transformers' apply_rotary_pos_emb, unsqueezed on the head axis)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The family's RMSNorm (Llama's rounding: weight times the normalised x in x's dtype) as one fused op."""
    eps = module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps
    return rms_norm(x, module.weight, eps, 0.0, True, torch.promote_types(module.weight.dtype, x.dtype))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **kw) -> torch.Tensor:
    if q.shape[1] != k.shape[1]:
        if _SDPA_GQA:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)


class Decoder:
    """Static-cache decoding of ``batch`` rows of at most ``max_len`` tokens each (prompt + reply)."""

    def __init__(
        self, model: nn.Module, batch: int, max_len: int, graph: bool | None = None, fused: bool = True
    ) -> None:
        reason = unsupported_reason(model, max_len)
        if reason:
            raise ValueError(f"the static decoder cannot run this model: {reason}")
        cfg = model.config
        self.model, self.body = model, model.model
        self.structure = structure(model)
        self.batch, self.max_len = batch, max_len
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        emb = model.get_input_embeddings()
        self.device = _device(model)
        self.qkv = [
            _SharedInput([la.self_attn.q_proj, la.self_attn.k_proj, la.self_attn.v_proj]) for la in self.body.layers
        ]
        self.gate_up = [_SharedInput([la.mlp.gate_proj, la.mlp.up_proj]) for la in self.body.layers]
        # fused: kbit's RMSNorm / RoPE / SwiGLU kernels (rounded as the unfused ops round) instead of the modules'.
        self.fused = fused
        self.silu = fused and getattr(cfg, "hidden_act", None) in ("silu", "swish")
        self.dtype = next((p.dtype for p in self.body.layers[0].input_layernorm.parameters()), emb.weight.dtype)
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.body.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.body.layers]
        # Static step inputs/outputs: the graph reads and writes these tensors and no others.
        self.tok = torch.zeros(batch, dtype=torch.long, device=self.device)
        # A table kept in host memory is looked up outside the graph (a CPU op cannot be captured) into this buffer.
        self.host_rows = (
            torch.zeros(batch, 1, cfg.hidden_size, dtype=self.dtype, device=self.device)
            if emb.weight.device != self.device
            else None
        )
        self.pos = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.rows = torch.arange(batch, device=self.device)
        self.keys = torch.arange(max_len, device=self.device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        use_graph = self.device.type == "cuda" if graph is None else graph
        if use_graph:
            self._capture()

    # ---- the layers ----

    def _norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _norm(module, x) if self.fused else module(x)

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, write, attend) -> torch.Tensor:
        """Run every decoder layer on x [B, T, hidden]; ``write(i, k, v)`` stores the new keys, ``attend`` reads."""
        b, t, _ = x.shape
        cos, sin = self.body.rotary_emb(x, positions)
        for i, layer in enumerate(self.body.layers):
            att = layer.self_attn
            h = self._norm(layer.input_layernorm, x).view(b * t, -1)
            q, k, v = self.qkv[i](h)
            q = q.view(b, t, self.heads, self.head_dim)
            k = k.view(b, t, self.kv_heads, self.head_dim)
            v = v.view(b, t, self.kv_heads, self.head_dim)
            if hasattr(att, "q_norm"):  # Qwen3 normalises each head before the rotation
                q, k = self._norm(att.q_norm, q), self._norm(att.k_norm, k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q, k = apply_rotary(q, k, cos, sin) if self.fused else (_rope(q, cos, sin), _rope(k, cos, sin))
            write(i, k, v)
            o = attend(i, q, k, v).transpose(1, 2).reshape(b * t, -1)
            x = project(att.o_proj, o, residual=x.view(b * t, -1)).view(b, t, -1)
            h = self._norm(layer.post_attention_layernorm, x).view(b * t, -1)
            mlp = layer.mlp
            gate, up = self.gate_up[i](h)
            gated = swiglu(gate, up) if self.silu else mlp.act_fn(gate) * up
            x = project(mlp.down_proj, gated, residual=x.view(b * t, -1)).view(b, t, -1)
        return x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the last position of x [B, T, hidden]."""
        last = self._norm(self.body.norm, x[:, -1:, :]).view(x.shape[0], -1)
        return project(self.model.get_output_embeddings(), last)

    @torch.no_grad()
    def prefill(self, row: int, ids: torch.Tensor) -> torch.Tensor:
        """Write prompt ``ids`` [T] into cache row ``row``; return the logits [V] after its last token."""
        t = ids.numel()
        if t > self.max_len:
            raise ValueError(f"prompt of {t} tokens does not fit the cache of {self.max_len}")
        x = self.model.get_input_embeddings()(ids.view(1, t).to(self.device))
        positions = torch.arange(t, device=self.device).view(1, t)

        def write(i, k, v):
            self.k[i][row, :, :t] = k[0]
            self.v[i][row, :, :t] = v[0]

        def attend(i, q, k, v):
            return _attend(q, k, v, self.scale, is_causal=t > 1)

        logits = self._head(self._layers(x, positions, write, attend))
        self.pos[row] = t
        return logits[0]

    def _step_body(self) -> torch.Tensor:
        """One token per row at ``self.pos``: writes the cache, returns logits [B, V]."""
        x = self.host_rows if self.host_rows is not None else self.model.get_input_embeddings()(self.tok.view(-1, 1))
        positions = self.pos.view(-1, 1)
        valid = (self.keys[None, :] <= self.pos[:, None]).view(self.batch, 1, 1, self.max_len)
        # Additive once per step: given a boolean mask, SDPA would rebuild this in every layer (two launches each).
        mask = torch.zeros(valid.shape, dtype=self.dtype, device=self.device).masked_fill_(~valid, float("-inf"))

        def write(i, k, v):
            self.k[i][self.rows, :, self.pos] = k[:, :, 0]
            self.v[i][self.rows, :, self.pos] = v[:, :, 0]

        def attend(i, q, k, v):
            return _attend(q, self.k[i], self.v[i], self.scale, attn_mask=mask)

        return self._head(self._layers(x, positions, write, attend))

    def _capture(self) -> None:
        # Warm up on a side stream (compiles the Triton kernels, initialises cuBLAS), then capture. The garbage
        # written at position 0 is overwritten by the next prefill.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):
                self._step_body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.logits = self._step_body()

    @torch.no_grad()
    def refresh_adapters(self) -> None:
        """Copy the current LoRA A weights into the stacked copies the decode step reads."""
        for shared in (*self.qkv, *self.gate_up):
            shared.refresh()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (at each row's position), advance the positions, return logits [B, V]."""
        self.tok.copy_(tokens)
        if self.host_rows is not None:
            self.host_rows.copy_(self.model.get_input_embeddings()(self.tok.view(-1, 1)))
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._step_body()
        self.pos += 1
        return logits


def decoder_for(model: nn.Module, batch: int, max_len: int) -> Decoder:
    """A decoder for ``model`` with room for ``batch`` rows of ``max_len`` tokens, reused across calls.

    The cache length is rounded up to a multiple of 256 (capped by the model's context) so that a chat or a prompts
    file keeps one captured graph instead of capturing one per length.
    """
    limit = getattr(model.config, "max_position_embeddings", None) or max_len
    want = max(max_len, min(limit, -(-max_len // 256) * 256))
    window = _attention_window(model.config)
    if window:
        want = max(max_len, min(want, window))  # rounding up must not cross the attention window
    cached = getattr(model, "_kbit_decoder", None)
    if (
        cached is not None
        and cached.batch == batch
        and cached.max_len >= max_len
        and cached.device == _device(model)
        and cached.structure == structure(model)
    ):
        cached.refresh_adapters()
        return cached
    model._kbit_decoder = None  # free the old cache before allocating the new one
    model._kbit_decoder = Decoder(model, batch, want)
    return model._kbit_decoder


def structure(model: nn.Module) -> tuple:
    """Identity of every module, with each LoRA layer's scale and on/off switch: a captured graph is stale once a
    module is swapped (an adapter added, a merge) or an adapter of another scale, or none, is switched on (the graph
    holds the scale as a constant; adapters of the same scale switch in place under it)."""
    return tuple((id(m), m.scale, m.enabled) if isinstance(m, LoRALinear) else id(m) for m in model.modules())


def _device(model: nn.Module) -> torch.device:
    # The decoder layers' device: the input embedding table may be kept on the CPU (the trainer's memory mode).
    return next(model.model.layers[0].parameters()).device


@torch.no_grad()
def decode(
    model: nn.Module,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    end_ids: list[int],
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    check_every: int = 16,
) -> list[list[int]]:
    """New token ids per prompt (each cut after its first end token), all prompts decoded together.

    The host looks at the tokens only every ``check_every`` steps (to stop once every row has ended), so the device
    never waits for Python between steps.
    """
    from .sampling import pick

    n = len(prompts)
    dec = decoder_for(model, n, max(int(p.numel()) for p in prompts) + max_new_tokens)
    dec.pos.zero_()
    first = torch.stack([dec.prefill(i, p) for i, p in enumerate(prompts)])
    out = torch.empty((n, max_new_tokens), dtype=torch.long, device=dec.device)
    ends = torch.tensor(end_ids or [-1], device=dec.device)
    done = torch.zeros(n, dtype=torch.bool, device=dec.device)
    nxt = pick(first, temperature, top_k, top_p, generator)
    steps = max_new_tokens
    for s in range(max_new_tokens):
        out[:, s] = nxt
        done |= torch.isin(nxt, ends)
        if s + 1 == max_new_tokens:
            break
        if (s + 1) % check_every == 0 and bool(done.all()):
            steps = s + 1
            break
        nxt = pick(dec.step(nxt), temperature, top_k, top_p, generator)
    result = []
    for row in out[:, :steps].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in end_ids), len(row))
        result.append(row[:cut])
    return result
