"""SLM <-> LLM routing: answer locally or forward to a bigger model (used by ``slm serve``).

* :mod:`~slmkit.route.config` -- the ``--fallback`` options and ``slm route VERB`` configs;
* :mod:`~slmkit.route.scores` -- cascade scores from the engine's token log-probabilities;
* :mod:`~slmkit.route.router` -- the prompt router (the local model's hidden states or
  MiniLM, a logistic classifier), ``slm route train``;
* :mod:`~slmkit.route.client` -- the fallback server's client (retries, deadline);
* :mod:`~slmkit.route.calibrate` -- thresholds for a target share or quality;
* :mod:`~slmkit.route.evaluate` -- ``slm route eval``: APGR and the quality-vs-share curves.

The HTTP side (one endpoint over both models) is :mod:`slmkit.serve.hybrid`.
"""
