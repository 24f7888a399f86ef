"""Model building blocks: tensor-parallel linears, rotary embedding, norms, attention, sampler.

The layers a backend may replace with its own kernels are declared in
:mod:`sagellm.layers.registry` (``LayerKind``, ``SWAPPABLE_LAYERS``).
"""
