"""A small, readable LLaMA in eager PyTorch: config, blocks, KV cache, generation, loading.

Module and parameter names follow Hugging Face transformers (``embed_tokens``, ``layers.{i}.self_attn
.q_proj``, ``input_layernorm``, ...), so a transformers checkpoint loads by stripping its ``model.``
prefix.  Every op comes from :mod:`llama_kernels.reference` through a class attribute, an *op slot*
(``RMSNorm.rms_norm``, ``MLP.swiglu``, ``Attention.apply_rotary``, ``Attention.attention``,
``Attention.decode_attention``, ``Llama.cross_entropy``), which :func:`llama_kernels.apply_kernels`
overrides with the Triton kernels.

:meth:`Llama.loss` is the training objective: the LM head and the next-token cross-entropy in one
op (``Llama.cross_entropy``), so that the fused kernel never materialises the ``(tokens, vocab)``
logits; :meth:`Llama.forward` and it share :meth:`Llama.hidden_states`, the body up to the final norm.

Generation runs each new token through :meth:`Llama.forward` with an ``int`` ``start_pos`` (the
cache is sliced to its filled part), or, for ``generate(..., cuda_graphs=True)``, through a
:class:`StaticDecodeStep`: ``start_pos`` is then a tensor on the device, the keys/values are
written with ``index_copy_`` and attention runs over the whole cache buffer with per-row lengths on
the device, so every step has the same shapes, syncs nothing with the host, and is captured once in
a CUDA graph and replayed for every token.

Each block is pre-norm with the residual add fused into the next norm: the running residual stream
travels beside the block output, and ``norm(x, residual)`` returns ``(rms_norm(x + residual),
x + residual)``, which is the same arithmetic as ``h = residual + x; norm(h)``.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference


@dataclass
class LlamaConfig:
    """Hyper-parameters, with transformers' field names (``LlamaConfig(**hf_config_fields)`` works)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # default hidden_size // num_attention_heads
    rope_scaling: dict | None = field(default=None)  # {"rope_type": "llama3", ...} (Llama 3.1+)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("num_hidden_layers", self.num_hidden_layers, minimum=0)
        _check_number("rms_norm_eps", self.rms_norm_eps, minimum=0.0)
        _check_number("rope_theta", self.rope_theta, minimum=0.0, strict=True)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                    f"({self.num_attention_heads}), or head_dim must be given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_int("head_dim", self.head_dim, minimum=2)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_hf(cls, hf_config) -> "LlamaConfig":
        """Build from a transformers ``LlamaConfig`` (or its ``config.json`` dict), 4.x or 5.x.

        Raises ``ValueError`` naming every setting whose math this model does not implement (see
        :func:`hf_config_differences`): such a checkpoint would load and silently compute
        something else.
        """
        d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        differences = hf_config_differences(d)
        if differences:
            raise ValueError(
                "this checkpoint's math differs from the reference LLaMA, so it cannot be loaded: "
                + "; ".join(differences)
            )
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        known = {f.name for f in fields(cls)} - {"rope_theta", "rope_scaling"}
        return cls(
            **{k: d[k] for k in known if d.get(k) is not None},
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            rope_scaling=rope if rope_type == "llama3" else None,
        )


# The label that Llama.loss ignores (PyTorch's and transformers' default ignore_index).
IGNORE_INDEX = -100

# model_types whose math is this model's (Mistral: only without a sliding window, checked below).
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# Settings of transformers' configs that change the math, with the value that leaves it LLaMA's
# (None: any value set is refused).  A key absent from a config, or None, means "off".
NEUTRAL_SETTINGS = {
    "attention_bias": False, "mlp_bias": False,
    "sliding_window": None, "use_sliding_window": False,
    "embedding_multiplier": 1.0, "residual_multiplier": 1.0, "attention_multiplier": None,
    "logits_scaling": 1.0, "partial_rotary_factor": 1.0,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "query_pre_attn_scalar": None,
    "use_bidirectional_attention": False, "use_qk_norm": False,
}


def hf_config_differences(d: dict) -> list[str]:
    """What in the transformers config dict ``d`` the reference LLaMA does not implement, one
    phrase each (empty when it loads exactly)."""
    differences = []
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        differences.append(f"model_type is {model_type!r} (supported: {', '.join(map(repr, SUPPORTED_MODEL_TYPES))})")
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        differences.append(f"hidden_act is {act!r} (the MLP is SwiGLU: 'silu')")
    for key, neutral in NEUTRAL_SETTINGS.items():
        value = d.get(key)
        if value is not None and value != neutral:  # None: not set, transformers' default applies
            differences.append(f"{key} is {value!r} (supported: {neutral!r})")
    no_rope = d.get("no_rope_layers")
    if no_rope is not None and not all(no_rope):  # SmolLM3: 0 marks a layer without RoPE
        differences.append("no_rope_layers skips RoPE in some layers (every layer uses RoPE here)")
    layer_types = [t for t in d.get("layer_types") or () if t != "full_attention"]
    if layer_types:
        differences.append(f"layer_types has {sorted(set(layer_types))} layers (all are 'full_attention' here)")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        differences.append(f"rope_type is {rope_type!r} ('default' and 'llama3' are supported)")
    return differences


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value, minimum: float, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, got {value}")


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies ``theta ** (-2i / D)``, with Llama 3's long-context scaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class RMSNorm(nn.Module):
    rms_norm = staticmethod(reference.rms_norm)  # op slot

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        return self.rms_norm(x, self.weight, self.eps, residual=residual)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MLP(nn.Module):
    swiglu = staticmethod(reference.swiglu)  # op slot

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self.swiglu(self.gate_proj(x), self.up_proj(x)))


class KVCache:
    """Preallocated keys and values of every layer, ``(B, Hk, max_len, D)`` each; no reallocation,
    so a decode step has static shapes.  ``layers[i]`` is layer ``i``'s ``(k, v)`` buffer pair."""

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, dtype, device):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
        self.batch, self.max_len = batch, max_len

    def update(self, layer: int, k, v, start_pos: int):
        """Write ``k, v (B, Hk, T, D)`` at ``start_pos`` and return views of everything cached so far."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} needed")
        k_cache, v_cache = self.layers[layer]
        k_cache[:, :, start_pos:end] = k
        v_cache[:, :, start_pos:end] = v
        return k_cache[:, :, :end], v_cache[:, :, :end]

    def write(self, layer: int, k, v, positions):
        """Write ``k, v (B, Hk, T, D)`` at ``positions`` (a ``(T,)`` int64 tensor on the cache's device)
        and return layer ``layer``'s whole ``(k, v)`` buffers: the static-shape twin of :meth:`update`
        (no slicing by a host-side length, nothing read back to the host)."""
        k_cache, v_cache = self.layers[layer]
        k_cache.index_copy_(2, positions, k.to(k_cache.dtype))  # casts as update's assignment does
        v_cache.index_copy_(2, positions, v.to(v_cache.dtype))
        return k_cache, v_cache


class Attention(nn.Module):
    apply_rotary = staticmethod(reference.apply_rotary)  # op slot
    attention = staticmethod(reference.flash_attention)  # op slot
    # op slot of the static decode step: attention over whole cache buffers, lengths on the device
    decode_attention = staticmethod(reference.flash_decode)

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        )
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, start_pos: int | torch.Tensor = 0,
                cache_seqlens: torch.Tensor | None = None):
        """With ``cache_seqlens`` (int32 ``(B,)``: the static decode step), ``start_pos`` is the
        ``(T,)`` tensor of this chunk's positions in ``cache``; otherwise an ``int``."""
        b, t, _ = x.shape
        # (B, T, H, D) projections seen as (B, H, T, D) views: the ops read them through strides.
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # Under autocast q is half while cos/sin follow the float32 residual stream.
        q, k = self.apply_rotary(q, k, cos.to(q.dtype), sin.to(q.dtype))
        if cache_seqlens is not None:
            k_cache, v_cache = cache.write(self.layer_idx, k, v, start_pos)
            o = self.decode_attention(q, k_cache, v_cache, cache_seqlens)
        else:
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v, start_pos)
            o = self.attention(q, k, v, causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, cos, sin, cache=None, start_pos=0, cache_seqlens=None):
        """``x``: the previous block's output; ``residual``: the stream before it (None at layer 0)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        attn = self.self_attn(h, cos, sin, cache, start_pos, cache_seqlens)
        h, residual = self.post_attention_layernorm(attn, residual)
        return self.mlp(h), residual


class Llama(nn.Module):
    """Decoder-only LLaMA: ``model(input_ids) -> logits (B, T, vocab)``; ``model.loss(input_ids)``
    -> the mean next-token cross-entropy."""

    # op slot: LM head + cross-entropy in one call, (hidden, weight, target, bias=None, *,
    # ignore_index=-100, reduction="mean", label_smoothing=0.0) -> float32 loss
    cross_entropy = staticmethod(reference.fused_linear_cross_entropy)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        # Activation checkpointing (llama_kernels.long_context.checkpoint_layers): called as
        # checkpoint(block, x, residual, cos=cos, sin=sin) in place of each block in training; None: off.
        self.layer_checkpoint = None
        self.apply(self._init_weights)

    def _apply(self, fn, *args, **kwargs):
        # `.to(bfloat16)` would round the rotary frequencies too: recompute them in float32 instead.
        super()._apply(fn, *args, **kwargs)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids, cache: KVCache | None = None, start_pos: int | torch.Tensor = 0):
        """Logits for ``input_ids (B, T)`` at positions ``start_pos ..``; with ``cache``, keys and
        values of earlier positions come from it and this call's are written into it.

        ``start_pos`` may also be a one-element integer tensor on the model's device (with
        ``cache``): the static step, whose shapes and launches do not depend on the position (the
        attention reads the whole cache buffer, masked by lengths computed on the device), as
        capturing it in a CUDA graph requires; see :class:`StaticDecodeStep`.
        """
        return self.lm_head(self.hidden_states(input_ids, cache, start_pos))

    def hidden_states(self, input_ids, cache: KVCache | None = None, start_pos: int | torch.Tensor = 0):
        """The final normed hidden states ``(B, T, hidden_size)`` of ``input_ids (B, T)``: what
        ``lm_head`` reads.  Arguments as for :meth:`forward`, which is ``lm_head(hidden_states(...))``."""
        _check_input_ids(input_ids)
        b, t = input_ids.shape
        x = self.embed_tokens(input_ids)
        cache_seqlens = None
        if isinstance(start_pos, torch.Tensor):
            if cache is None:
                raise ValueError("a tensor start_pos (the static decode step) needs a cache")
            if start_pos.numel() != 1 or start_pos.dtype.is_floating_point or start_pos.dtype.is_complex:
                raise ValueError(
                    f"start_pos must be an int or a one-element integer tensor, got a {start_pos.dtype} "
                    f"tensor of shape {tuple(start_pos.shape)}"
                )
            positions = start_pos.reshape(()).long() + torch.arange(t, device=input_ids.device)
            # Every row holds the same tokens so far: all of them up to the last of this chunk.
            cache_seqlens = (positions[-1:] + 1).to(torch.int32).expand(b)
            start_pos = positions
        else:
            positions = torch.arange(start_pos, start_pos + t, device=input_ids.device)
        cos, sin = reference.rotary_cos_sin(positions, self.inv_freq, x.dtype)
        # Not with a cache: the recompute would write its keys and values a second time.
        checkpoint = self.layer_checkpoint if self.training and cache is None and torch.is_grad_enabled() else None
        residual = None
        for layer in self.layers:
            if checkpoint is None:
                x, residual = layer(x, residual, cos, sin, cache, start_pos, cache_seqlens)
            else:  # cos, sin by keyword: shared by every block, the checkpoint need not copy them
                x, residual = checkpoint(layer, x, residual, cos=cos, sin=sin)
        x, _ = self.norm(x, residual)
        return x

    def loss(self, input_ids, labels=None):
        """Mean next-token cross-entropy (float32) of ``input_ids (B, T)``, a scalar tensor.

        ``labels`` (an integer tensor of ``input_ids``' shape) defaults to ``input_ids``; position
        ``t`` is scored against ``labels[:, t + 1]``, the shift done here as transformers'
        ``ForCausalLMLoss`` does it (so labels are passed unshifted, as to a ``*ForCausalLM``), and
        positions labelled ``-100`` are ignored.  The LM head and the loss are one op, the
        ``cross_entropy`` slot, so the patched model never materialises the logits.
        """
        _check_input_ids(input_ids)  # first, so that labels are compared with a valid input_ids
        if labels is None:
            labels = input_ids
        else:
            _check_labels(labels, input_ids)
        hidden = self.hidden_states(input_ids)
        # Keeps the (B, T) shape of `hidden`'s leading dims; the last position is ignored.
        shifted = reference.next_token_labels(labels, IGNORE_INDEX)
        # The op wants int64 targets on the hidden states' device (labels may be int32, or on the
        # host as a data loader leaves them: transformers' loss moves them too).
        shifted = shifted.to(device=hidden.device, dtype=torch.long)
        if type(self.lm_head) is not nn.Linear:  # a quantised head: no weight to fuse, the logits are made
            logits = self.lm_head(hidden).float()
            return F.cross_entropy(logits.flatten(0, -2), shifted.flatten(), ignore_index=IGNORE_INDEX)
        return self.cross_entropy(hidden, self.lm_head.weight, shifted, ignore_index=IGNORE_INDEX)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens."""
        p = self.embed_tokens.weight
        return KVCache(self.config, batch, max_len, p.dtype, p.device)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, cuda_graphs: bool = False):
        """Continue ``input_ids (B, T)`` by ``max_new_tokens`` tokens with a KV cache.

        Greedy (argmax) at ``temperature == 0``; otherwise samples from ``softmax(logits / temperature)``,
        restricted to the ``top_k`` most likely tokens when given.  Returns ``(B, T + max_new_tokens)``.

        With ``cuda_graphs=True`` (CUDA only) the prompt runs as usual, then one decode step is
        captured in a CUDA graph (:class:`StaticDecodeStep`) and replayed for every further token,
        which removes the per-kernel launch overhead of small batches.
        """
        _check_input_ids(input_ids)
        _check_int("max_new_tokens", max_new_tokens, minimum=0)
        _check_sampling(temperature, top_k)
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        if max_new_tokens == 0:
            return input_ids
        b, t = input_ids.shape
        tokens = [input_ids]
        cache = self.new_cache(b, t + max_new_tokens)
        if cuda_graphs:
            decode_step = StaticDecodeStep(self, cache, cuda_graph=True)  # checks the device first
        else:
            def decode_step(token, position):
                return self(token, cache, position)[:, -1]
        logits = self(input_ids, cache, 0)[:, -1]
        for step in range(max_new_tokens):
            next_token = sample(logits, temperature, top_k, generator)
            tokens.append(next_token)
            if step + 1 < max_new_tokens:
                logits = decode_step(next_token, t + step)
        return torch.cat(tokens, dim=1)

    @classmethod
    def from_hf(cls, hf_model_or_dir) -> "Llama":
        """Load transformers LLaMA weights: a ``LlamaForCausalLM``/``LlamaModel`` object, or a directory
        holding ``config.json`` and ``*.safetensors`` (read without transformers)."""
        if isinstance(hf_model_or_dir, (str, Path)):
            from safetensors.torch import load_file

            path = Path(hf_model_or_dir)
            hf_config = json.loads((path / "config.json").read_text())
            state = {}
            for shard in sorted(path.glob("*.safetensors")):
                state.update(load_file(shard))
            if not state:
                raise ValueError(f"no *.safetensors weights in {path}")
            dtype = next(iter(state.values())).dtype
        else:
            hf_config = hf_model_or_dir.config
            state = hf_model_or_dir.state_dict()
            dtype = next(hf_model_or_dir.parameters()).dtype
        config = LlamaConfig.from_hf(hf_config)
        model = cls(config).to(dtype)
        state = {k.removeprefix("model."): v for k, v in state.items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match LLaMA: missing {missing}, unexpected {unexpected}")
        return model


class StaticDecodeStep:
    """One decode step of ``model`` over ``cache`` with static shapes, optionally as a CUDA graph.

    ``step(token (B, 1), position) -> logits (B, vocab)`` writes the keys and values of ``token``
    at ``position`` of ``cache`` and returns the next-token logits.  The token and the position
    are copied into fixed device buffers and the model runs with a tensor ``start_pos`` (see
    :meth:`Llama.forward`), so every call launches the same kernels on the same memory.  With
    ``cuda_graph=True`` (CUDA only) the first call captures that step in a ``torch.cuda.CUDAGraph``
    and every call replays it; the returned logits are then a buffer that the next call overwrites.
    """

    def __init__(self, model: Llama, cache: KVCache, cuda_graph: bool = False):
        device = model.embed_tokens.weight.device
        if cuda_graph and device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need the model on a CUDA device; it is on {device} "
                "(use cuda_graphs=False there)"
            )
        self.model, self.cache, self.cuda_graph = model, cache, cuda_graph
        self.token = torch.zeros((cache.batch, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.graph = self.logits = None

    def _run(self):
        return self.model(self.token, self.cache, self.position)[:, -1]

    @torch.no_grad()
    def __call__(self, token, position: int):
        if not 0 <= position < self.cache.max_len:  # checked here: on the device it would be an assert
            raise ValueError(f"position must be in [0, {self.cache.max_len}) for this cache, got {position}")
        self.token.copy_(token)
        self.position.fill_(position)  # a host scalar written to the device: no synchronisation
        if not self.cuda_graph:
            return self._run()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self):
        # Warm up on a side stream first: Triton compiles its kernels and the caching allocator
        # sizes its blocks on the first calls, neither of which may happen during a capture.  The
        # warm-up writes this step's keys and values, exactly what the replay writes again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()


def _check_input_ids(input_ids) -> None:
    """A ``(batch, seq_len)`` integer tensor with at least one token per row (checked before the
    embedding, whose own errors would not name the argument)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor (token ids), got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}"
            + (" (add a batch dimension: input_ids[None])" if input_ids.dim() == 1 else "")
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one sequence of at least one token, got shape "
                         f"{tuple(input_ids.shape)}")


def _check_labels(labels, input_ids) -> None:
    """An integer tensor of ``input_ids``' shape (``IGNORE_INDEX`` marks positions not scored)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (token ids, {IGNORE_INDEX} to ignore), got {labels.dtype}")
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"labels must have input_ids' shape {tuple(input_ids.shape)} (they are shifted inside), "
            f"got {tuple(labels.shape)}"
        )


def _check_sampling(temperature, top_k) -> None:
    _check_number("temperature", temperature, minimum=0.0)
    if top_k is not None:
        _check_int("top_k", top_k, minimum=1)


def sample(logits, temperature: float = 0.0, top_k: int | None = None, generator=None):
    """One token per row of ``logits (B, vocab)``: argmax at temperature 0, else a softmax sample,
    restricted to the ``top_k`` most likely tokens when given (``top_k >= 1``)."""
    _check_sampling(temperature, top_k)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
