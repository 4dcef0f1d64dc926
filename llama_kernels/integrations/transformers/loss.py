"""The fused LM head + loss inside transformers' ``*ForCausalLM`` models.

transformers computes a causal LM's training loss from the full logits: ``lm_head(hidden)`` (a
``(tokens, vocab)`` tensor, 4 GB in float32 at 8k tokens and LLaMA-3's 128,256-token vocabulary),
then ``ForCausalLMLoss``.  No extension point sits between the two, so ``patch.apply_kernels``'s
``cross_entropy`` row replaces the model's ``forward`` with :func:`causal_lm_forward`: one generic
function for every ``*ForCausalLM`` of the LLaMA family (their forwards all run ``self.model``,
slice the last hidden states for ``logits_to_keep``, apply ``lm_head`` and the loss), dressed with
the original forward's signature.  In training mode with ``labels`` it computes the loss with
:func:`~llama_kernels.ops.cross_entropy.fused_linear_cross_entropy` and returns ``logits=None``;
every other call runs the original forward.  :func:`lm_head_unsupported` says at patch time which
models' heads it cannot stand in for (final-logit soft-capping, heads that are not a plain
``nn.Linear``).
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch

from ... import reference
from ...ops.cross_entropy import fused_linear_cross_entropy


# Keyword arguments that transformers renamed: old name -> new name.  A forward whose signature has
# the new name takes the old one through `deprecate_kwarg`, which the fused path (binding against
# the undecorated signature) does not run, so it renames them itself.
RENAMED_ARGUMENTS = {"past_key_values": "cache"}  # 5.0's name; later 5.x releases say `cache`


@functools.cache
def causal_lm_forward(base: type):
    """:func:`_causal_lm_forward` dressed as ``base.forward`` (name, docstring, signature).

    transformers reads the arguments a model takes from ``inspect.signature(model.forward)``: the
    Trainer drops dataset columns it does not name and passes ``num_items_in_batch`` only to a
    forward with ``**kwargs``, ``generate`` passes ``logits_to_keep`` only where it is named.  The
    code is the one generic function; only its signature differs per class (cached, so each class
    keeps one function).
    """
    @functools.wraps(base.forward)
    def forward(self, *args, **kwargs):
        return _causal_lm_forward(base, self, *args, **kwargs)

    return forward


def _causal_lm_forward(base: type, self, *args, **kwargs):
    """``forward`` of a patched transformers ``*ForCausalLM`` (any of the LLaMA family).

    In training mode, with ``labels`` and the model's standard loss (``ForCausalLMLoss``), it runs
    ``self.model`` with exactly the arguments the original forward would pass it, slices the last
    hidden states as ``logits_to_keep`` says, and computes the loss with
    ``fused_linear_cross_entropy`` on ``lm_head``'s weight and bias: same loss and gradients, the
    logits never materialised, so the output has ``logits=None``.  Any other call (eval mode, no
    labels, a custom ``loss_function``, an LM head that is not a plain ``nn.Linear`` or has hooks)
    runs the original class's forward unchanged.
    """
    forward = base.forward
    if not self.training:
        return forward(self, *args, **kwargs)
    call_kwargs = dict(kwargs)
    # can_return_tuple's rule (it decorates the original forward, and pops return_dict before the
    # body sees it): the call's return_dict, else the config's.
    return_dict = call_kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = self.config.return_dict
    signature = _signature(forward)  # the undecorated forward's (inspect follows __wrapped__)
    params = signature.parameters
    for old, new in RENAMED_ARGUMENTS.items():
        if old in call_kwargs and old not in params and new in params:
            value = call_kwargs.pop(old)
            call_kwargs.setdefault(new, value)  # deprecate_kwarg keeps the new name when both are given
    try:
        bound = signature.bind(self, *args, **call_kwargs)
    except TypeError:
        return forward(self, *args, **kwargs)  # a bad call: let the original raise its own error
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    kinds = {name: p.kind for name, p in params.items()}
    # kernel_summary counts this model's fused loss by the same _fused_loss_applies: only training
    # mode and the labels, which depend on the call, are decided here alone.
    if arguments.get("labels") is None or not _fused_loss_applies(self):
        return forward(self, *args, **kwargs)
    # The original body: self.model(every named argument but labels and logits_to_keep, **kwargs),
    # the loss function getting those same **kwargs (num_items_in_batch, ignore_index, shift_labels).
    extra = {}
    for name, kind in kinds.items():
        if kind is inspect.Parameter.VAR_KEYWORD:
            extra = arguments.pop(name, {})
    arguments.pop(next(iter(params)))  # self
    labels = arguments.pop("labels")
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    outputs = self.model(**arguments, **extra)
    hidden = _slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    loss = _causal_lm_loss(hidden, self.lm_head, labels, **extra)

    from transformers.modeling_outputs import CausalLMOutputWithPast

    # The cache field is `past_key_values` in transformers 5.0 and `cache` later: copy whichever
    # the output class has from the base model's output, as the original does.
    # (the class's field table, not dataclasses.fields(): Dynamo traces a dict's keys)
    copied = {name: getattr(outputs, name, None) for name in CausalLMOutputWithPast.__dataclass_fields__
              if name not in ("loss", "logits")}
    output = CausalLMOutputWithPast(loss=loss, logits=None, **copied)
    return output if return_dict else output.to_tuple()


def _fused_loss_applies(model) -> bool:
    """Whether the fused loss computes what ``model``'s own LM head and loss function would, i.e.
    whether a training call with labels runs it now.

    The one test of both the patched forward (on every call) and ``patch.kernel_summary`` (which
    counts the model's ``cross_entropy`` only while this holds), so the two cannot disagree.  It is
    asked again at each call, not only at patch time, because the head can change after patching:
    PEFT's ``modules_to_save=["lm_head"]`` wraps it in a ``ModulesToSaveWrapper``, a LoRA on
    ``lm_head`` replaces it, accelerate hooks it.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    from ...replacements import original_class

    head = getattr(model, "lm_head", None)
    params = _signature(original_class(model).forward).parameters.values()
    return (
        lm_head_unsupported(model) is None
        # Hooks may move the weight in (accelerate's offloading, tensor parallelism) or change the
        # logits: the fused op reads the weight without calling the module, so they would be skipped.
        and not head._forward_hooks and not head._forward_pre_hooks and "forward" not in vars(head)
        and isinstance(getattr(model, "model", None), torch.nn.Module)
        and model.loss_function is ForCausalLMLoss
        # a signature not of the family (the fused path rebinds the call's arguments)
        and all(p.kind is not inspect.Parameter.VAR_POSITIONAL for p in params)
    )


def lm_head_unsupported(module) -> Optional[str]:
    """Why the fused loss cannot stand in for ``module``'s LM head and loss, or None."""
    softcap = getattr(module.config, "final_logit_softcapping", None)
    if softcap is not None:  # Gemma 2/3 squash the logits with tanh before the loss
        return f"final_logit_softcapping {softcap} (the fused loss takes the LM head's plain logits)"
    head = getattr(module, "lm_head", None)
    if type(head) is not torch.nn.Linear:  # quantised or adapter heads are subclasses or wrappers
        return f"an lm_head of type {type(head).__name__} (the fused loss reads a torch.nn.Linear's weight)"
    return None


@functools.cache
def _signature(function) -> inspect.Signature:
    """``inspect.signature(function)``, computed once per forward rather than every training step."""
    return inspect.signature(function)


try:  # recent 5.x forwards call this helper (it also takes 2-D index tensors and boolean masks)
    from transformers.modeling_utils import slice_logits_to_keep as _transformers_slice
except ImportError:  # (imported here, once: Dynamo cannot trace a failing import)
    _transformers_slice = None


def _slice_logits_to_keep(hidden, logits_to_keep):
    """The hidden states the original forward feeds its LM head for ``logits_to_keep``."""
    if _transformers_slice is None:
        # transformers 5.0 inlines it: an int keeps the last k positions (0 keeps all of them), a
        # tensor indexes the sequence dimension.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden[:, keep, :]
    return _transformers_slice(hidden, logits_to_keep)


def _causal_lm_loss(hidden, lm_head, labels, /, *, num_items_in_batch=None, ignore_index=-100,
                    shift_labels=None, **_):
    """transformers' ``ForCausalLMLoss(lm_head(hidden), labels, ...)`` with the fused op: labels
    shifted left (unless ``shift_labels`` is given), ``ignore_index`` ignored, the mean, or the sum
    divided by ``num_items_in_batch`` when given (as ``fixed_cross_entropy`` does)."""
    if shift_labels is None:
        shift_labels = reference.next_token_labels(labels, ignore_index)
    # ForCausalLMLoss flattens logits and labels (view(-1, vocab), view(-1)) and moves the labels
    # to the logits' device.
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), lm_head.weight,
                                      shift_labels.reshape(-1).to(hidden.device), lm_head.bias,
                                      ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
