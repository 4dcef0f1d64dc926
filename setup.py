from pathlib import Path

from setuptools import find_packages, setup

HF = ["transformers>=5.0,<6", "gguf>=0.10", "accelerate", "safetensors"]

setup(
    name="llama-kernels",
    version="0.1.0",
    description="Fused Triton kernels for LLaMA-family models: RMSNorm, SwiGLU, RoPE, flash attention",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The benchmarks (benchmarks/) and tools (tools/) run from a source checkout, never installed.
    packages=find_packages(include=["llama_kernels", "llama_kernels.*"]),
    # Lower bounds are the oldest releases CI tests (`make test-oldest`, pins in .ci/oldest-constraints.txt:
    # torch 2.11.0, transformers 5.0.0); the newest pass `make test-latest`. Move both together.
    # Triton: 3.6 (the oldest job) to 3.9 (the latest job and the compile matrix), the releases CI runs.
    install_requires=["torch>=2.11,<3", "triton>=3.6,<3.10", "numpy", "einops"],
    extras_require={
        # Triton 3.6's CPU interpreter fails on numpy >= 2.3 (loop bounds from tl.program_id).
        # ruff: the lint `make test-latest` runs first (its rules in pyproject.toml; pinned, as new releases add rules).
        "dev": ["pytest>=8", "pytest-timeout", "pytest-xdist", "hypothesis>=6", "numpy<2.3", "ruff==0.17.6"],
        "hf": HF,
        "bench": ["matplotlib"],
        # LoRA / QLoRA (tests/test_peft.py): the releases it was checked on; bitsandbytes runs 4-bit
        # and 8-bit layers on the CPU too.
        "lora": [*HF, "peft>=0.21", "bitsandbytes>=0.50"],
    },
    entry_points={"console_scripts": ["llama-kernels=llama_kernels.cli:main"]},
)
