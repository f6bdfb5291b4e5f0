"""Weight quantization: RTN, GPTQ, AWQ to int8 / int4 (see ``api.py`` for the entry points).

Names are resolved lazily so that importing a submodule (``ops``, ``gptq_ops``) does not
import the step's config and API.
"""

_API = ("dequantize", "dequantize_model", "is_quantized", "quantize_model", "run_quantize")
_CONFIG = ("QuantizeConfig", "QuantizeOptions", "make_config")
__all__ = list(_API + _CONFIG)


def __getattr__(name):
    if name in _API:
        from slmkit.compress.quantize import api

        return getattr(api, name)
    if name in _CONFIG:
        from slmkit.compress.quantize import config

        return getattr(config, name)
    raise AttributeError(f"module 'slmkit.compress.quantize' has no attribute {name!r}")
