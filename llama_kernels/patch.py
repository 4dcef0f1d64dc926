def apply_kernels(model, **kw):
    return model
