"""The former name of :mod:`llama_kernels.ops.glu` (the kernels run GeGLU too), kept for imports of it."""
from .glu import GatedLinearFunction, GLUFunction, gated_linear, geglu, swiglu  # noqa: F401

SwiGLUFunction = GLUFunction
