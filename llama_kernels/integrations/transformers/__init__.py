"""The kernels inside transformers' LLaMA-family models (transformers 5.x).

``llama_kernels.patch.apply_kernels`` reaches this package lazily, the first time it meets a
transformers model; importing the package itself imports nothing (neither transformers nor torch),
so its modules are loaded only by what uses them:

* :mod:`.families`: the one declaration of the model families (LLaMA, Mistral, Qwen2/3, Gemma 1/2/3,
  Phi-3): transformers' module and class names, the config options that switch on each family's own
  features in a tiny model, the real model the benchmarks measure and Liger's patch function.
  Imports neither torch nor transformers.
* :mod:`.rows`: the rows of ``apply_kernels``' table for those families' decoder modules (RMSNorm,
  MLP, attention with the RoPE kernel inside, ``*ForCausalLM``) and the step that switches a model
  to the kernels' attention.
* :mod:`.attention`: the attention function registered with transformers' ``AttentionInterface``,
  which picks a kernel for each layer or falls back to the model's unpatched attention.
* :mod:`.mask_plan`: the mask function registered with ``AttentionMaskInterface`` and the
  :class:`~.mask_plan.MaskPlan` it builds: what one forward's mask means, in terms the kernels take.
* :mod:`.masks`: recognising transformers' mask functions (causal, sliding window, packed
  sequences) and packed batches from FlashAttention's keyword arguments.
* :mod:`.host_values`: the few device values the plan reads on the host, at most once per forward.
* :mod:`.loss`: the ``*ForCausalLM`` forward with the fused LM head + loss.
"""
