"""Weight quantization: RTN, GPTQ, AWQ to int8 / int4 (see ``api.py`` for the entry points)."""

from slmkit.compress.quantize.api import (  # noqa: F401
    dequantize,
    dequantize_model,
    is_quantized,
    quantize,
    quantize_model,
)
from slmkit.compress.quantize.config import QuantizeConfig, make_config  # noqa: F401
