"""Evaluation: perplexity and bits per byte, task accuracy, speed/memory, comparison reports.

Modules (imported lazily, nothing heavy here):

* :mod:`~slmkit.eval.perplexity`: ``perplexity(model, tokenizer, data, split, ...)``.
* :mod:`~slmkit.eval.tasks`: JSONL task files, multiple-choice and generation scoring.
* :mod:`~slmkit.eval.mining`: built-in stdlib tasks mined with ``ast``.
* :mod:`~slmkit.eval.speed`: prefill/decode speed, TTFT, peak memory, size, bits/weight.
* :mod:`~slmkit.eval.evaluate`: ``evaluate_model(ref, ...)`` behind ``slm eval``.
* :mod:`~slmkit.eval.compare`: ``compare(refs, out)`` behind ``slm compare``.
* :mod:`~slmkit.eval.ops`: the pure math (windows, log-likelihoods, metrics, Pareto).
"""
