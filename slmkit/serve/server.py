"""Load a model (optionally with a LoRA adapter merged in) and run the server.

``slm serve`` calls :func:`load_for_serving` then :func:`run_server`. Shutdown on SIGTERM
or Ctrl-C is graceful: the replica drains first (``/health`` answers 503 ``draining`` and new
requests get a retryable 503 for ``drain_seconds``, see :mod:`slmkit.serve.drain`), then
uvicorn stops accepting connections, in-flight streams get ``shutdown_timeout`` seconds to
finish, the rest are cancelled (their engine slots freed), the engine thread stops, and the
process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path

import uvicorn

from slmkit.errors import ConfigError, ModelLoadError
from slmkit.serve.config import ServeCommand, ServeConfig


def merge_adapter(model, adapter_dir: str | Path):
    """Load a PEFT LoRA adapter over ``model`` and merge it into the weights.

    The merged model is plain dense again, so the engine's fast path serves it at full
    speed. Only ``adapter_model.safetensors`` is read (never pickles).

    Raises:
        ModelLoadError: peft missing, or the directory is not a safetensors PEFT adapter.
    """
    adapter = Path(adapter_dir)
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError("--adapter needs the peft package; install it with "
                          "`pip install peft`.") from None
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter} is not a PEFT adapter directory (no "
                             "adapter_config.json); pass the folder a LoRA run saved.")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise ModelLoadError(f"{adapter} has no adapter_model.safetensors; re-save the adapter "
                             "with safe_serialization=True (pickled weights are refused).")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        merged = peft_model.merge_and_unload()
    except Exception as e:  # shape mismatch: adapter trained on another base
        raise ModelLoadError(f"Cannot apply the adapter {adapter} to this model ({e}); serve it "
                             "on the base model it was trained from.") from None
    return merged.eval()


def load_for_serving(model_ref: str, adapter: str | Path | None = None, dtype: str = "fp32"):
    """``(model, tokenizer)`` ready for :func:`slmkit.serve.create_app`."""
    from slmkit.models import load_model

    model, tokenizer = load_model(model_ref, dtype=dtype)
    if adapter is not None:
        model = merge_adapter(model, adapter)
    return model, tokenizer


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def configure_access_log(stream=None) -> None:
    """One JSON line per request on stderr (the records are already JSON)."""
    logger = logging.getLogger("slmkit.serve.access")
    if not any(getattr(h, "_slmkit", False) for h in logger.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(_JsonLines())
        handler._slmkit = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class DrainingServer(uvicorn.Server):
    """A uvicorn server that cancels in-flight generations ``drain_after`` s into shutdown.

    uvicorn alone waits for open responses and finally cancels their tasks with a
    traceback in the log; cancelling the generations instead lets every stream end with an
    OpenAI error frame (503, ``shutting_down``) and frees the engine before it stops.
    """

    def __init__(self, config: uvicorn.Config, service, drain_after: float,
                 lifecycle=None, drain_seconds: float = 0.0):
        super().__init__(config)
        self.service, self.drain_after = service, drain_after
        self.lifecycle, self.drain_seconds = lifecycle, drain_seconds

    async def main_loop(self) -> None:
        """Serve until a stop signal, then drain: keep the port open ``drain_seconds``
        while ``/health`` says draining and new requests are refused (retryable)."""
        await super().main_loop()
        if self.lifecycle is None:
            return
        self.lifecycle.start_drain()
        logging.getLogger("slmkit.serve.access").info(json.dumps(
            {"event": "draining", "seconds": self.drain_seconds}))
        end = time.monotonic() + self.drain_seconds
        while time.monotonic() < end and not self.force_exit:
            await asyncio.sleep(0.05)

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self.drain_after,
                                                      self.service.engine.drain)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def run_server(model, tokenizer, config: ServeConfig, on_ready=None) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully and return.

    Args:
        on_ready: called with the bound ``(host, port)`` once the server accepts requests.
    """
    from slmkit.serve.app import create_app
    from slmkit.serve.drain import DrainGate, Lifecycle

    app = create_app(model, tokenizer, config)
    configure_access_log()
    lifecycle = Lifecycle()
    engine = app.state.service.engine
    gated = DrainGate(app, lifecycle, lambda: engine.running + engine.queue_depth)
    # uvicorn's own deadline is only a backstop: at shutdown_timeout we cancel what is
    # still generating ourselves, so every stream ends with a proper error frame.
    uv_config = uvicorn.Config(gated, host=config.host, port=config.port, log_level="warning",
                               access_log=False, lifespan="on",
                               timeout_graceful_shutdown=config.shutdown_timeout + 10)
    server = DrainingServer(uv_config, app.state.service, config.shutdown_timeout, lifecycle,
                            config.drain_seconds)
    if on_ready is not None:
        startup = server.startup

        async def startup_then_report(sockets=None):
            await startup(sockets=sockets)
            if server.started:
                sock = server.servers[0].sockets[0]
                on_ready(*sock.getsockname()[:2])

        server.startup = startup_then_report
    # uvicorn re-raises the signal it caught once it is done; with the default handler
    # that would kill us with 143. A no-op handler makes a graceful stop exit 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except SystemExit:  # uvicorn exits 1 when it cannot bind
        server.started = False
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not server.started:
        raise ConfigError(f"Could not listen on {config.host}:{config.port} (port in use or "
                          "not allowed); pick another --port or --host.")
    logging.getLogger("slmkit.serve.access").info(json.dumps({
        "event": "shutdown", "clean": True, "refused_while_draining": lifecycle.refused}))


def run_serve(cmd: ServeCommand) -> None:
    """``slm serve``: load the model (and adapter), serve until stopped, print where."""
    from slmkit.console import console, print_table

    config = cmd.server_config()
    lm, tok = load_for_serving(cmd.model, adapter=cmd.adapter, dtype=cmd.dtype)
    started = {}

    def ready(bound_host: str, bound_port: int) -> None:
        started["url"] = f"http://{bound_host}:{bound_port}"
        print_table("slm serve", [
            ("model", f"{config.name} ({cmd.model})"
                      + (f" + adapter {cmd.adapter}" if cmd.adapter else "")),
            ("chat page", started["url"] + "/"),
            ("OpenAI base URL", started["url"] + "/v1"),
            ("auth", "Bearer API key" if config.api_key else "none (loopback only is safest)"),
            ("slots / queue", f"{config.max_concurrency} / {config.max_queue}"),
            ("KV cache", config.kv_cache),
            ("draft", config.draft or "none"),
            ("CORS", ", ".join(config.cors_origins) or "off"),
            ("monitoring", "confidence + flag per answer" if config.monitor else "off"),
            ("request log", (config.request_log + (" (with text)" if config.log_prompts
                                                    else " (no text)"))
             if config.request_log else "off"),
            ("canary", f"{config.canary} every {config.canary_every}" if config.canary
             else "off"),
            *([("documents (--rag)", f"{config.rag} ({config.rag_mode}, "
                f"{config.rag_context_chunks} of {config.rag_k} chunks in the prompt, "
                f"abstains under {config.rag_min_score:g})")] if config.rag else []),
            *([("fallback", f"{config.fallback} ({config.route_mode}"
                + (f", router {config.router}" if config.route_mode == "router" else
                   f", signal {config.route_signal}" if config.route_mode == "cascade" else "")
                + ")")] if config.fallback else [])])
        console.print("[dim]Ctrl-C or SIGTERM stops gracefully; one JSON log line per request "
                      "follows on stderr.[/dim]", highlight=False)

    run_server(lm, tok, config, on_ready=ready)
    print_table("slm serve", [("stopped", "cleanly"), ("served at", started.get("url", "-"))])
