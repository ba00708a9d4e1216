"""Weight-only int8 / int4 quantization: schemes, modules, the pass, checkpoints, fused decode kernels.

    import graphfix
    report = graphfix.quantize(model, "int4", group_size=64)   # nn.Linear -> QuantLinear, in place

See docs/quantization.md.
"""

from graphfix.quant.api import QuantizeReport, is_quantized, quantize
from graphfix.quant.linear import QuantEmbedding, QuantLinear
from graphfix.quant.scheme import QuantScheme, parse_scheme

__all__ = ["QuantEmbedding", "QuantLinear", "QuantScheme", "QuantizeReport", "is_quantized", "parse_scheme",
           "quantize"]
