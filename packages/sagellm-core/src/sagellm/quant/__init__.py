"""Weight-only quantization: how a linear's weight is stored in fewer bits and multiplied.

* :mod:`sagellm.quant.grids` - the quantization grids as plain tensors (quantize, dequantize).
* :mod:`sagellm.quant.int8` / :mod:`sagellm.quant.int4` - packed weights on torch's CPU kernels.
* :mod:`sagellm.quant.gguf_blocks` - GGUF's stored 4/8-bit blocks read as those grids.
* :mod:`sagellm.quant.apply` - choosing a scheme for a model and quantizing it on load.

The layer side, a linear that multiplies by a packed weight, is
:mod:`sagellm.layers.quant_linear`.
"""
