"""OpenAI-compatible local server over the continuous-batching engine.

* :func:`create_app` -- the FastAPI app for a loaded model (tests mount it directly);
* :func:`run_server` -- uvicorn with graceful shutdown (what ``slm serve`` runs);
* :func:`load_for_serving` -- load a model dir, optionally merging a LoRA adapter;
* :class:`ServeConfig` -- every server setting.

FastAPI and uvicorn are imported lazily so that ``import slmkit`` stays light.
"""

from slmkit.serve.config import ServeConfig, resolve_api_key


def create_app(model, tokenizer, config: ServeConfig | None = None):
    """See :func:`slmkit.serve.app.create_app`."""
    from slmkit.serve.app import create_app as _create_app

    return _create_app(model, tokenizer, config)


def run_server(model, tokenizer, config: ServeConfig, on_ready=None) -> None:
    """See :func:`slmkit.serve.server.run_server`."""
    from slmkit.serve.server import run_server as _run_server

    _run_server(model, tokenizer, config, on_ready=on_ready)


def load_for_serving(model_ref, adapter=None, dtype: str = "fp32"):
    """See :func:`slmkit.serve.server.load_for_serving`."""
    from slmkit.serve.server import load_for_serving as _load

    return _load(model_ref, adapter=adapter, dtype=dtype)


__all__ = ["ServeConfig", "create_app", "load_for_serving", "resolve_api_key", "run_server"]
