"""Long-context training: chunked MLPs and activation checkpointing offloaded to host memory.

Two opt-in tools, exact in the sense below, for :class:`llama_kernels.model.Llama` and transformers
5.x models of the LLaMA family (with or without :func:`llama_kernels.apply_kernels`, before or after):

* :func:`chunked_mlp`.  At ``T`` tokens a gated MLP makes ``gate``, ``up`` and ``act(gate) * up``,
  ``T x I`` each (``I`` is 3-4 times ``hidden``), which autograd keeps for the backward, and their
  gradients are as large again: at long ``T`` the largest tensors of a layer.  The MLP is token-wise,
  so it runs here over chunks of ``C`` tokens, keeps only its input (``T x hidden``) and recomputes
  each chunk in the backward: ``C x I`` at a time instead of ``T x I``, for one more MLP forward.
  The output and the input gradient are the unchunked ones row for row; the parameters' gradients,
  sums over tokens, are summed chunk by chunk in float32 and rounded once.
* :func:`offloaded_checkpoint` / :func:`checkpoint_layers`.  Activation checkpointing keeps only each
  layer's inputs, ``layers x T x hidden``, which at long ``T`` still dominates device memory; here
  they go to host memory (pinned, copied on the current stream without waiting) and come back for
  the recompute.  The arithmetic is ``torch.utils.checkpoint``'s (the same forward, RNG state and
  autocast replayed): gradients equal plain non-reentrant checkpointing bit for bit.

Both install per-instance state only (an instance ``forward``, a checkpoint function attribute),
never a class, so they compose with ``apply_kernels``' class swaps and turn off by removing it.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import types

import torch
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import _get_device_module, _infer_device_type, get_device_states, set_device_states

from . import model as llama_model
from .replacements import outermost_pretrained

__all__ = ["chunked_mlp", "offloaded_checkpoint", "checkpoint_layers"]


# ---------------------------------------------------------------------------------------------
# what both recomputations replay: RNG state, autocast state; hooks that must not run twice
# ---------------------------------------------------------------------------------------------
class _RngState:
    """The CPU and device RNG states before a forward, as ``torch.utils.checkpoint``'s
    ``preserve_rng_state`` keeps them (its own helpers), so that dropout draws the same masks when
    the backward recomputes."""

    def __init__(self, tensors):
        tensors = list({t.device: t for t in tensors}.values())  # one per device: each state once
        self.device_type = _infer_device_type(*tensors)
        self.cpu_state = torch.get_rng_state()
        self.devices, self.states = [], []
        # Not initialising CUDA by asking for its state: without it nothing random ran there.
        if getattr(_get_device_module(self.device_type), "_initialized", False):
            self.devices, self.states = get_device_states(*tensors)

    @contextlib.contextmanager
    def restored(self):
        with torch.random.fork_rng(devices=self.devices, device_type=self.device_type):
            torch.set_rng_state(self.cpu_state)
            set_device_states(self.devices, self.states, device_type=self.device_type)
            yield


def _autocast_state(device_type: str) -> list[tuple[str, dict]]:
    """The autocast settings in force, for ``device_type`` and the CPU (as torch.utils.checkpoint)."""
    kinds = [device_type] if device_type != "cpu" and torch.amp.is_autocast_available(device_type) else []
    return [(kind, {"enabled": torch.is_autocast_enabled(kind), "dtype": torch.get_autocast_dtype(kind),
                    "cache_enabled": torch.is_autocast_cache_enabled()}) for kind in kinds + ["cpu"]]


@contextlib.contextmanager
def _autocast(state):
    with contextlib.ExitStack() as stack:
        for kind, settings in state:
            stack.enter_context(torch.amp.autocast(kind, **settings))
        yield


@contextlib.contextmanager
def _tensor_hooks_suspended(tensors):
    """Hooks registered with ``Tensor.register_hook`` on ``tensors`` silenced for a while.

    ``torch.autograd.grad`` inside a backward runs a parameter's hooks on the gradient it returns,
    and the outer backward runs them again when that gradient reaches the parameter: once is right
    (``register_post_accumulate_grad_hook`` hooks, DDP's and FSDP's, never run inside)."""
    held = []
    for t in tensors:
        hooks = t._backward_hooks
        if hooks:
            held.append((hooks, dict(hooks)))
            hooks.clear()  # the dict autograd's hook reads: emptied, not replaced
    try:
        yield
    finally:
        for hooks, saved in held:
            hooks.update(saved)


@contextlib.contextmanager
def _forward_keeping_nothing():
    """Run a forward as training runs it, without keeping anything for a backward.

    Grad mode stays on, on the inputs themselves (their ``requires_grad`` as they are), because
    ops may compute otherwise without it (the attention kernel takes its forward-only decode path
    when no gradient is needed), and the backward's recompute, which needs grad, must redo this
    very forward; every tensor an op saves is dropped on the spot, as non-reentrant
    ``torch.utils.checkpoint`` does, so only the graph's bookkeeping exists, and it goes with the
    outputs, which the caller detaches."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _dropped):
        yield


def _drop(tensor):
    return None


def _dropped(_):
    raise RuntimeError("llama_kernels.long_context: a chunked or checkpointed forward keeps nothing "
                       "for a backward (its own backward recomputes it)")


def _check_module(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _as_device(offload_device) -> torch.device:
    try:
        return torch.device(offload_device)
    except (TypeError, RuntimeError) as error:
        raise type(error)(
            f"offload_device must be a torch.device or a device name, got {offload_device!r}") from None


# ---------------------------------------------------------------------------------------------
# chunked_mlp
# ---------------------------------------------------------------------------------------------
def chunked_mlp(model: torch.nn.Module, chunk_tokens: int | None = 4096) -> torch.nn.Module:
    """Run every MLP of ``model`` over ``chunk_tokens`` tokens at a time in training; returns ``model``.

    With grad enabled, something to differentiate, and more than ``chunk_tokens`` tokens in the input
    (all leading dims count), each MLP call runs one chunk of tokens at a time without keeping its
    intermediates, writing into one output tensor, and keeps only its input for the backward, which
    recomputes each chunk (same RNG state and autocast) and differentiates it: no ``tokens x
    intermediate_size`` tensor (gate, up, activation, their gradients) exists whole.  The trainable
    parameters of the MLP (LoRA adapters inside it included) are inputs of that step, so
    ``torch.autograd.grad``, DDP and PEFT see their gradients, summed over chunks in float32 and
    rounded once to each parameter's dtype.  Otherwise (no grad, short inputs) the module's own
    forward runs unchanged.  Dropout inside the MLP (LoRA's) draws per chunk: other masks than an
    unchunked call would draw, the same ones in the recompute.

    The MLPs are the reference model's ``MLP`` and transformers' ``<Prefix>MLP`` of the LLaMA family
    (Phi-3's fused ``gate_up_proj`` included).  In place and idempotent; ``chunk_tokens=None``
    restores the plain forward.  ``apply_kernels`` may come before or after: each chunk runs the
    module's current class's ``forward``.
    """
    _check_module(model)
    if chunk_tokens is not None and (
            isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, numbers.Integral)):
        raise TypeError(f"chunk_tokens must be a positive int or None, got {type(chunk_tokens).__name__}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens}")
    classes = _mlp_classes(model)
    mlps = [m for m in model.modules() if isinstance(m, classes)]
    if not mlps:
        from .integrations.transformers.families import family_names

        raise TypeError(f"model must contain the MLP modules of llama_kernels.model.Llama or of a transformers "
                        f"model of a supported family ({family_names()}); {type(model).__name__} has none")
    for module in mlps:
        if chunk_tokens is None:
            _remove_chunked_forward(module)
        else:
            _install_chunked_forward(module, int(chunk_tokens))
    return model


def _mlp_classes(model) -> tuple:
    classes = [llama_model.MLP]
    # transformers' modeling modules only for a model made of them (importing them costs seconds).
    if any(cls.__module__.startswith("transformers.models.") for m in model.modules() for cls in type(m).__mro__):
        from .integrations.transformers.families import modeling_modules

        classes += [getattr(modeling, family.prefix + "MLP") for family, modeling in modeling_modules().items()]
    return tuple(classes)


def _is_chunked_forward(module, bound) -> bool:
    return isinstance(bound, types.MethodType) and bound.__func__ is _chunked_forward and bound.__self__ is module


def _install_chunked_forward(module, chunk_tokens: int) -> None:
    module._lk_chunk_tokens = chunk_tokens  # read at each call: re-calling only changes it
    # accelerate's hooks keep the forward they wrap as `_old_forward`: ours may be in there.
    if any(_is_chunked_forward(module, vars(module).get(attr)) for attr in ("forward", "_old_forward")):
        return
    previous = vars(module).get("forward")
    if previous is not None:  # a forward set on the instance (accelerate's hook): chunks go through it
        module._lk_unchunked_forward = previous
    module.forward = types.MethodType(_chunked_forward, module)


def _remove_chunked_forward(module) -> None:
    for attr in ("forward", "_old_forward"):
        if _is_chunked_forward(module, vars(module).get(attr)):
            previous = vars(module).pop("_lk_unchunked_forward", None)
            if previous is not None:
                setattr(module, attr, previous)
            elif attr == "forward":
                del module.forward  # the class's forward again
            else:
                module._old_forward = types.MethodType(type(module).forward, module)
    vars(module).pop("_lk_chunk_tokens", None)


def _unchunked_forward(module, *args, **kwargs):
    """The module's forward without chunking: the class's (as ``apply_kernels`` left it), or the
    instance forward that was there before ours."""
    previous = vars(module).get("_lk_unchunked_forward")
    return previous(*args, **kwargs) if previous is not None else type(module).forward(module, *args, **kwargs)


def _chunked_forward(self, *args, **kwargs):
    x = args[0] if len(args) == 1 and not kwargs else None  # the families' MLPs take one tensor
    if not isinstance(x, torch.Tensor) or not torch.is_grad_enabled():
        return _unchunked_forward(self, *args, **kwargs)
    params = [p for p in self.parameters() if p.requires_grad]
    if math.prod(x.shape[:-1]) <= self._lk_chunk_tokens or not (x.requires_grad or params):
        return _unchunked_forward(self, x)
    return _ChunkedMLP.apply(self, self._lk_chunk_tokens, x, *params)


class _ChunkedMLP(torch.autograd.Function):
    """``module(x)`` one chunk of tokens at a time; saves only ``x``; ``params`` are the module's
    trainable parameters (inputs here so that their gradients leave through this node)."""

    @staticmethod
    def forward(ctx, module, chunk, x, *params):
        ctx.rng, ctx.autocast = _RngState((x,)), _autocast_state(x.device.type)
        out = None
        with _forward_keeping_nothing():
            rows = x.reshape(-1, x.shape[-1])  # a view where the strides allow: no copy of its own
            for start in range(0, rows.shape[0], chunk):
                y = _unchunked_forward(module, rows[start:start + chunk]).detach()
                if out is None:  # its dtype is known now (autocast): one buffer, filled chunk by chunk
                    out = y.new_empty((rows.shape[0], y.shape[-1]))
                out[start:start + chunk] = y
        ctx.module, ctx.chunk, ctx.params = module, chunk, params
        ctx.save_for_backward(x)  # x itself, not `rows`: a reshape's copy would be kept twice
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (x,), params, chunk = ctx.saved_tensors, ctx.params, ctx.chunk
        needs_x = ctx.needs_input_grad[2]
        rows, grad_rows = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty(rows.shape, dtype=x.dtype, device=x.device) if needs_x else None
        sums = [None] * len(params)  # float32: chunks' gradients rounded once at the end
        # Chunks in the forward's order from the forward's RNG state: each draws its own masks again.
        with ctx.rng.restored(), _tensor_hooks_suspended(params):
            for start in range(0, rows.shape[0], chunk):
                piece = rows[start:start + chunk].detach().requires_grad_(needs_x)
                with torch.enable_grad(), _autocast(ctx.autocast):
                    y = _unchunked_forward(ctx.module, piece)
                inputs = [piece, *params] if needs_x else list(params)
                grads = torch.autograd.grad(y, inputs, grad_rows[start:start + chunk], allow_unused=True)
                if needs_x:
                    grad_x[start:start + chunk] = grads[0]
                    grads = grads[1:]
                for i, g in enumerate(grads):
                    if g is not None:
                        sums[i] = g.to(torch.float32, copy=True) if sums[i] is None else sums[i].add_(g)
        grad_params = [None if s is None else s.to(p.dtype) for s, p in zip(sums, params)]
        return None, None, None if grad_x is None else grad_x.view(x.shape), *grad_params


# ---------------------------------------------------------------------------------------------
# offloaded_checkpoint, checkpoint_layers
# ---------------------------------------------------------------------------------------------
def offloaded_checkpoint(function, *args, offload_device="cpu", params=None, **kwargs):
    """``function(*args, **kwargs)`` checkpointed, its positional tensors kept on ``offload_device``.

    A drop-in for ``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
    **kwargs)``: no intermediate activation of ``function`` is kept; the backward recomputes it from
    the inputs, with the forward's RNG state (dropout draws the same masks) and autocast state, and
    its gradients equal that checkpoint's.  What is kept differs: the positional tensor arguments
    (the hidden states) as copies on ``offload_device`` (from a CUDA tensor: pinned host memory,
    ``non_blocking`` copies on the current stream both ways, so the host never waits; a tensor
    already there is kept as is), keyword tensors and those bound in a ``functools.partial``
    ``function`` (rotary ``cos``/``sin``, masks: shared by every layer) by reference.

    Gradients reach every tensor argument that requires grad (in nested tuples, lists and dicts
    too) and the trainable parameters of ``params``: an ``nn.Module``, or an iterable of tensors.
    They are inputs of the checkpoint's autograd node, so it is in the graph even when no argument
    requires grad (LoRA with a frozen embedding), and ``torch.autograd.grad`` and DDP see them.
    ``params=None`` takes the module that ``function`` is (a module, a bound method of one, or a
    ``functools.partial`` of either or of a function with the module first, as transformers' layers
    pass it).  Tensors that ``function`` reaches in other ways (closures, other modules) get no
    gradient: name them in ``params``.  The output may be a tensor or a (nested) tuple with
    non-tensor entries (``None``).  Without grad enabled, or with nothing to differentiate,
    ``function`` just runs.  Double backward is not supported.
    """
    device = _as_device(offload_device)
    call, bound_args, bound_kwargs = _unwrap_partial(function)
    trainable = _trainable_params(params, function, call, bound_args)
    arg_leaves, arg_spec = pytree.tree_flatten(args)
    ref_leaves, ref_spec = pytree.tree_flatten((bound_args, {**bound_kwargs, **kwargs}))
    arg_tensors = [i for i, leaf in enumerate(arg_leaves) if isinstance(leaf, torch.Tensor)]
    grad_refs = [i for i, leaf in enumerate(ref_leaves) if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    if not torch.is_grad_enabled() or not (
            trainable or grad_refs or any(arg_leaves[i].requires_grad for i in arg_tensors)):
        return function(*args, **kwargs)
    run = _Call(call, arg_leaves, arg_spec, arg_tensors, ref_leaves, ref_spec, grad_refs, device)
    tensors = _OffloadedCheckpoint.apply(
        run, *(arg_leaves[i] for i in arg_tensors), *(ref_leaves[i] for i in grad_refs), *trainable)
    return run.rebuild_output(tensors)


def _unwrap_partial(function):
    """``(callable, bound positional args, bound keyword args)`` of a (nested) ``functools.partial``."""
    bound_args, bound_kwargs = (), {}
    while isinstance(function, functools.partial):
        bound_args = function.args + bound_args  # an outer partial's arguments come after the inner's
        bound_kwargs = {**function.keywords, **bound_kwargs}  # ... and its keywords win
        function = function.func
    return function, bound_args, bound_kwargs


def _trainable_params(params, function, call, bound_args) -> list:
    if params is None:
        owners = (function, call, getattr(function, "__self__", None), getattr(call, "__self__", None),
                  bound_args[0] if bound_args else None)
        params = next((m for m in owners if isinstance(m, torch.nn.Module)), ())
    if isinstance(params, torch.nn.Module):
        return [p for p in params.parameters() if p.requires_grad]
    if isinstance(params, torch.Tensor) or not hasattr(params, "__iter__"):
        raise TypeError(
            f"params must be an nn.Module, an iterable of tensors or None, got {type(params).__name__}")
    tensors = {}
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"params must be an nn.Module, an iterable of tensors or None; it holds a {type(p).__name__}")
        if p.requires_grad:
            tensors.setdefault(id(p), p)  # each once: a tensor twice would be counted twice
    return list(tensors.values())


class _Call:
    """The checkpointed call, its tensors taken out: positional tensors and keyword tensors that
    require grad go through the autograd node, the rest (non-tensors, other keyword tensors) stay
    here.  No positional tensor is held here: that would keep the hidden states on the device."""

    def __init__(self, call, arg_leaves, arg_spec, arg_tensors, ref_leaves, ref_spec, grad_refs, device):
        self.call, self.arg_spec, self.ref_spec, self.device = call, arg_spec, ref_spec, device
        self.arg_leaves = [None if i in arg_tensors else leaf for i, leaf in enumerate(arg_leaves)]
        self.ref_leaves = [None if i in grad_refs else leaf for i, leaf in enumerate(ref_leaves)]
        self.arg_tensors, self.grad_refs = arg_tensors, grad_refs
        self.out_leaves = self.out_spec = None

    def __call__(self, arg_tensors, ref_tensors):
        arg_leaves, ref_leaves = list(self.arg_leaves), list(self.ref_leaves)
        for i, t in zip(self.arg_tensors, arg_tensors):
            arg_leaves[i] = t
        for i, t in zip(self.grad_refs, ref_tensors):
            ref_leaves[i] = t
        bound_args, kwargs = pytree.tree_unflatten(ref_leaves, self.ref_spec)
        return self.call(*bound_args, *pytree.tree_unflatten(arg_leaves, self.arg_spec), **kwargs)

    def keep_output_structure(self, output) -> tuple:
        """The tensors of the forward's ``output``; the rest of it is kept to rebuild it around them."""
        leaves, self.out_spec = pytree.tree_flatten(output)
        self.out_leaves = [_TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        return _tensors_of(output)

    def rebuild_output(self, tensors):
        tensors = iter(tensors)
        leaves = [next(tensors) if leaf is _TENSOR else leaf for leaf in self.out_leaves]
        return pytree.tree_unflatten(leaves, self.out_spec)


_TENSOR = object()  # marks an output tensor's place in the output's structure


def _tensors_of(output) -> tuple:
    return tuple(leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor))


def _offload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` for the backward: itself if already there; from CUDA to the host into
    pinned memory without waiting (the copy is ordered on the current stream before anything that
    later reuses ``t``'s memory, and the pinned block is not reused before the copy back is done)."""
    if t.device == device:
        return t
    if device.type == "cpu" and t.device.type == "cuda":
        held = torch.empty_like(t, device=device, pin_memory=True)
        return held.copy_(t.detach(), non_blocking=True)
    return t.detach().to(device)


class _OffloadedCheckpoint(torch.autograd.Function):
    """``run(...)`` without its activations: saves its positional tensors (offloaded), recomputes
    in the backward.  Inputs: positional tensors, keyword tensors that require grad, parameters."""

    @staticmethod
    def forward(ctx, run, *tensors):
        n_args, n_refs = len(run.arg_tensors), len(run.grad_refs)
        arg_tensors, ref_tensors = tensors[:n_args], tensors[n_args:n_args + n_refs]
        # The state to replay, read before anything runs: torch.utils.checkpoint reads it off the
        # positional tensors; keyword tensors count too here (a CUDA mask with CPU hidden states).
        kept = (t for t in run.ref_leaves if isinstance(t, torch.Tensor))
        ctx.rng = _RngState([*tensors[:n_args + n_refs], *kept])
        ctx.autocast = _autocast_state(ctx.rng.device_type)
        ctx.run, ctx.ref_tensors, ctx.params = run, ref_tensors, tensors[n_args + n_refs:]
        ctx.devices = [t.device for t in arg_tensors]
        ctx.save_for_backward(*(_offload(t, run.device) for t in arg_tensors))
        ctx.set_materialize_grads(False)  # an output nobody used has no gradient: skip it, as autograd does
        with _forward_keeping_nothing():
            output = run(arg_tensors, ref_tensors)
        return run.keep_output_structure(pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, output))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        run, params = ctx.run, ctx.params
        n_args = len(run.arg_tensors)
        needs = ctx.needs_input_grad[1:]
        arg_tensors = [(t.to(device, non_blocking=True) if t.device != device else t).detach().requires_grad_(need)
                       for t, device, need in zip(ctx.saved_tensors, ctx.devices, needs)]
        ref_tensors = [t.detach().requires_grad_() for t in ctx.ref_tensors]
        with ctx.rng.restored(), torch.enable_grad(), _autocast(ctx.autocast):
            outputs = _tensors_of(run(arg_tensors, ref_tensors))
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        targets = [t for t, need in zip(arg_tensors, needs) if need] + ref_tensors + list(params)
        grads = iter([None] * len(targets))
        if pairs and targets:
            with _tensor_hooks_suspended(params):
                grads = iter(torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs],
                                                 allow_unused=True))
        arg_grads = [next(grads) if need else None for need in needs[:n_args]]
        return None, *arg_grads, *grads


def checkpoint_layers(model: torch.nn.Module, *, offload: bool = True, offload_device="cpu",
                      enabled: bool = True) -> torch.nn.Module:
    """Checkpoint every decoder layer of ``model`` in training; returns ``model``.

    ``offload=True``: :func:`offloaded_checkpoint`, each layer's input hidden states held on
    ``offload_device`` (host memory by default) until the backward; ``offload=False``: plain
    non-reentrant ``torch.utils.checkpoint``.  ``enabled=False`` turns checkpointing off again.

    * :class:`llama_kernels.model.Llama` (found anywhere inside ``model``): its ``layer_checkpoint``
      is set, which ``Llama.hidden_states`` calls for each block in training with grad enabled and
      no KV cache.
    * transformers: ``gradient_checkpointing_enable`` (``activation_checkpointing_enable`` where it
      exists) of the outermost ``PreTrainedModel`` inside ``model``, non-reentrant, then with
      ``offload`` every layer's ``_gradient_checkpointing_func`` replaced by ``offloaded_checkpoint``
      bound to that layer's parameters; ``enabled=False`` calls ``gradient_checkpointing_disable``.
    """
    _check_module(model)
    _check_bool("offload", offload)
    _check_bool("enabled", enabled)
    device = _as_device(offload_device)
    function = (None if not enabled else functools.partial(offloaded_checkpoint, offload_device=device) if offload
                else functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False))
    references = [m for m in model.modules() if isinstance(m, llama_model.Llama)]
    for llama in references:
        llama.layer_checkpoint = function
    pretrained = outermost_pretrained(model) if not references else []
    if not references and not pretrained:
        raise TypeError(f"model must be a llama_kernels.model.Llama or hold a transformers PreTrainedModel; "
                        f"{type(model).__name__} has neither")
    for hf_model in pretrained:
        if not enabled:
            _hf_call(hf_model, "disable")
            continue
        if not hf_model.supports_gradient_checkpointing:
            raise ValueError(f"model: {type(hf_model).__name__} does not support gradient checkpointing")
        _hf_call(hf_model, "enable")
        if offload:
            for module in hf_model.modules():
                if hasattr(module, "gradient_checkpointing"):  # the modules transformers gave the function
                    module._gradient_checkpointing_func = functools.partial(function, params=module)
    return model


def _hf_call(hf_model, what: str) -> None:
    # transformers 5.2x renamed gradient_* to activation_checkpointing_* (the old names warn).
    new = getattr(hf_model, f"activation_checkpointing_{what}", None)
    if what == "enable":
        if new is not None:
            new(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (new or hf_model.gradient_checkpointing_disable)()
