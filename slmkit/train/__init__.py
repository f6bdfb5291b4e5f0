"""The one training loop (:mod:`.loop`) with pluggable objectives (:mod:`.objectives`).

``slm train`` is :func:`slmkit.train.run.run_training`; its options are
:class:`slmkit.train.config.TrainConfig`.
"""
