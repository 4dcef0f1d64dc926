"""Benchmarks of llama_kernels: ``python -m benchmarks`` (see benchmarks/README.md).

Nothing is imported here: ``benchmarks.__main__`` must choose Triton's interpreter (on a machine
without CUDA) before anything imports triton.
"""
