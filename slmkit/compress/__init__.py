"""Model compression: quantize, prune, factorize.

Shared plumbing: :mod:`slmkit.compress.match` (select linears by regex),
:mod:`slmkit.compress.calibrate` (layer-by-layer calibration),
:mod:`slmkit.compress.hessian` (``2XXᵀ`` and its damped Cholesky inverse).

Importing the package registers the compact N:M format that ``slm prune --compact`` writes
with :mod:`slmkit.models.formats` (by module path: nothing heavy is imported here).
"""

from slmkit.models.formats import register_format

register_format("nm_sparse", "slmkit.compress.prune.nm_format:load")
