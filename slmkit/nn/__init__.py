"""slmkit's drop-in layers: each replaces one ``nn.Linear`` with the same call signature.

Importing the package registers the on-disk formats of its layers with
:mod:`slmkit.models.formats` (by module path: nothing heavy is imported here).
"""

from slmkit.models.formats import register_format

register_format("quant", "slmkit.nn.quant_format:load")       # slm quantize (int8/int4/int3)
register_format("lowrank", "slmkit.nn.lowrank:load_lowrank")  # slm factorize (B @ A factors)
