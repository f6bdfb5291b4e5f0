"""slmkit: build, shrink, serve and watch small language models on your own hardware.

    >>> import slmkit
    >>> model, tok = slmkit.load_model("runs/teacher")
    >>> slmkit.save_model(model, tok, "runs/copy", step="copy")
"""

__version__ = "0.1.0"

# The layer packages register their on-disk formats with slmkit.models.formats on import
# (module paths only, no torch), so that load_model knows every format wherever it is called.
from slmkit import compress, nn  # noqa: E402, F401

__all__ = ["__version__", "load_model", "save_model", "dequantize"]


def __getattr__(name):
    # Lazy so that `import slmkit` (and `slm --help`) does not import torch.
    if name in ("load_model", "save_model", "load_tokenizer"):
        from slmkit.models import io

        return getattr(io, name)
    if name == "dequantize":
        from slmkit.compress.quantize.api import dequantize

        return dequantize
    raise AttributeError(f"module 'slmkit' has no attribute {name!r}")
