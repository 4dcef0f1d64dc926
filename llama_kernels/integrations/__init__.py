"""Integrations of the kernels with other libraries' models: :mod:`.transformers` (Hugging Face)."""
