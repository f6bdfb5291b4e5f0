"""Model compression: quantize, prune, factorize.

Shared plumbing: :mod:`slmkit.compress.match` (select linears by regex),
:mod:`slmkit.compress.calibrate` (layer-by-layer calibration),
:mod:`slmkit.compress.hessian` (``2XXᵀ`` and its damped Cholesky inverse).
"""
