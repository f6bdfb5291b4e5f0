"""Typed settings of ``slm serve`` (one pydantic model shared by the CLI and the app)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from slmkit.errors import ConfigError
from slmkit.rag.config import RagServeOptions
from slmkit.route.config import RouteOptions
from slmkit.step import cli

#: Environment variable read for the API key when neither --api-key nor --api-key-file is set.
API_KEY_ENV = "SLM_API_KEY"


class ServeConfig(RouteOptions, RagServeOptions):
    """Everything the server needs besides the model (``--fallback`` and the routing
    options come from :class:`~slmkit.route.config.RouteOptions`, ``--rag`` and its options
    from :class:`~slmkit.rag.config.RagServeOptions`).

    Attributes:
        name: the model id clients send and see in ``/v1/models``.
        host, port: where to listen (loopback by default: nothing is exposed by accident).
        api_key: when set, every ``/v1/*`` and ``/metrics`` request needs
            ``Authorization: Bearer <api_key>``.
        cors_origins: origins allowed by CORS; empty = CORS off (same-origin only).
        max_concurrency: requests decoded at once (engine KV-cache slots).
        max_queue: requests allowed to wait for a slot; one more gets 429 + Retry-After.
        max_prompt_tokens: longest prompt accepted (None = the engine's context - 1).
        max_tokens_cap: largest ``max_tokens`` accepted (None = the engine's context).
        default_max_tokens: ``max_tokens`` when a request leaves it out (capped).
        request_timeout: seconds a request may take from arrival to its last token (504).
        shutdown_timeout: seconds in-flight streams get to finish on SIGTERM before they
            are cancelled.
        drain_seconds: seconds from SIGTERM to closing the port, in which ``/health``
            answers 503 ``draining`` and new requests a retryable 503 while running streams
            go on (:mod:`slmkit.serve.drain`); 0 closes the port at once.
        max_seq_len: prompt + output tokens per request (None = model context, <= 2048).
        threads: torch threads of the engine (None = physical cores).
        kv_cache: KV cache dtype: auto (fp16 for quantized fp32 models, else the model's
            dtype), fp32, fp16, bf16 or int8.
        draft: speculative decoding's draft (:mod:`slmkit.engine.speculative`): ``ngram``
            or a draft model directory; None decodes without drafts.
        log_prompts: put prompt text in the per-request log line, and prompt and answer text
            in the request log database (off for privacy).
        monitor: compute each answer's confidence figures and hallucination flag (the
            ``confidence`` field of every choice, and ``/metrics``); off saves one
            ``log_softmax`` per generated token.
        flag_model: a flag model refitted for this model (``FlagModel.save``'s JSON); None
            uses the one fitted on the built-in model.
        request_log: SQLite file of the request log (None = no log); see
            :mod:`slmkit.monitor.log`.
        log_embedder: embeds each prompt into the request log for drift: ``minilm``
            (all-MiniLM-L6-v2) or ``none``.
        log_max_mb, log_max_days: retention of the request log.
        canary, canary_every, canary_drop, canary_webhook: continuous evaluation
            (:mod:`slmkit.serve.canary`): a generation task file scored every interval,
            an alert when the score falls more than ``canary_drop`` below the first run.
        max_request_bytes: largest request body accepted (413 above it, refused before
            reading when ``Content-Length`` declares more); 4 MiB is far above any prompt
            a small model's context holds.
    """

    name: str = Field("slm", description="Model id clients use.")
    host: str = Field("127.0.0.1", description="Interface to listen on (loopback by default; "
                      "0.0.0.0 exposes the server to the network).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).",
                      json_schema_extra=cli(short="-p"))
    api_key: str | None = Field(None, description="Require 'Authorization: Bearer KEY' (also "
                                "$SLM_API_KEY).")
    cors_origins: list[str] = Field(default_factory=list, description="Allow this browser "
                                    "origin (repeatable; off by default).",
                                    json_schema_extra=cli(flag="--cors-origin"))
    max_concurrency: int = Field(8, ge=1, le=256, description="Requests decoded at once "
                                 "(engine batch slots).")
    max_queue: int = Field(64, ge=0, description="Requests that may wait for a slot; more get "
                           "429.")
    max_prompt_tokens: int | None = Field(None, ge=1, description="Longest prompt accepted "
                                          "(default: context - 1).")
    max_tokens_cap: int | None = Field(None, ge=1, description="Largest max_tokens accepted "
                                       "(default: context).")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that "
                                    "leaves it out (capped).")
    request_timeout: float = Field(300.0, gt=0, description="Seconds per request before 504.")
    shutdown_timeout: float = Field(10.0, ge=0, description="Seconds streams get to finish on "
                                    "SIGTERM.")
    drain_seconds: float = Field(0.0, ge=0, le=3600, description="On SIGTERM, first keep "
                                 "listening this long with /health at 503 draining and new "
                                 "requests refused with a retryable 503 (behind a load "
                                 "balancer: at least its health-check interval).")
    max_seq_len: int | None = Field(None, ge=2, description="Prompt + reply tokens per request "
                                    "(KV cache per slot; default: the model's context, at "
                                    "most 2048).")
    threads: int | None = Field(None, ge=1, description="CPU threads of the engine (default: "
                                "physical cores).")
    kv_cache: Literal["auto", "fp32", "fp16", "bf16", "int8"] = Field(
        "auto", description="KV cache dtype: auto (fp16 for quantized fp32 models, else the "
        "model's), fp32, fp16, bf16 or int8 (half of fp16's bytes; long contexts).")
    draft: str | None = Field(None, description="Speculative decoding: 'ngram' (prompt "
                              "lookup) or a draft model dir sharing the tokenizer; each request "
                              "drafts while it pays.")
    log_prompts: bool = Field(False, description="Include prompt text in the request log (off "
                              "for privacy).")
    max_request_bytes: int = Field(4 << 20, ge=1024, description="Largest request body "
                                   "accepted (413 above it).")
    monitor: bool = Field(True, description="Per-answer confidence, hallucination flag and "
                          "their metrics (--no-monitor turns them off).",
                          json_schema_extra=cli(flag="--monitor/--no-monitor"))
    flag_model: str | None = Field(None, description="Hallucination-flag model JSON refitted "
                                   "for this model (default: the one fitted on the built-in "
                                   "model).")
    request_log: str | None = Field(None, description="Log every request to this SQLite file "
                                    "(figures and a prompt embedding; text only with "
                                    "--log-prompts).")
    log_embedder: Literal["minilm", "none"] = Field("minilm", description="Prompt embedding "
                                                    "stored in the request log, for drift.")
    log_max_mb: float = Field(256.0, gt=0, description="Request log size cap in MB (oldest "
                              "rows go first).")
    log_max_days: float = Field(30.0, gt=0, description="Request log rows older than this "
                                "many days are deleted.")
    canary: str | None = Field(None, description="Score this generation task file (JSONL) "
                               "against the live model in the background.")
    canary_every: str = Field("10m", description="Canary interval (30s, 10m, 1h).")
    canary_drop: float = Field(0.1, ge=0, le=1, description="Alert when the canary score "
                               "falls this much below its first run.")
    canary_webhook: str | None = Field(None, description="POST canary alerts as JSON to this "
                                       "URL.")

    @field_validator("canary_every")
    @classmethod
    def _interval(cls, v: str) -> str:
        from slmkit.serve.canary import parse_interval

        parse_interval(v)
        return v

    @model_validator(mode="after")
    def _canary_flags_need_canary(self):
        given = [f for f in ("canary_every", "canary_drop", "canary_webhook")
                 if getattr(self, f) != type(self).model_fields[f].default]
        if given and not self.canary:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ValueError(f"{flags} need --canary TASKS.jsonl; add it or drop them")
        if self.canary_webhook and not self.canary_webhook.startswith(("http://", "https://")):
            raise ValueError(f"--canary-webhook {self.canary_webhook!r} is not an http(s) URL")
        if self.rag and self.fallback:
            raise ValueError("--rag and --fallback cannot be combined yet (a forwarded request "
                             "would go without its sources); serve the index without a "
                             "fallback")
        return self


class ServeCommand(ServeConfig):
    """Options of ``slm serve``: the server's settings plus the model it loads."""

    model: str = Field(description="Model directory or hub id.",
                       json_schema_extra=cli(argument=True))
    name: str | None = Field(None, description="Model id clients use (default: the model "
                             "directory's name).")
    api_key_file: str | None = Field(None, description="Read the API key from this file.")
    adapter: str | None = Field(None, description="PEFT LoRA adapter dir to merge into the "
                                "model.")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="fp32 or bf16.")

    def server_config(self) -> ServeConfig:
        """The server's settings: the API key resolved (flag, file or environment) and the
        model id defaulted to the model directory's name."""
        key = resolve_api_key(self.api_key, Path(self.api_key_file) if self.api_key_file
                              else None)
        fields = self.model_dump(exclude={"model", "api_key_file", "adapter", "dtype"})
        fields.update(api_key=key, name=self.name or Path(self.model.rstrip("/")).name or "slm")
        return ServeConfig(**fields)


def resolve_api_key(api_key: str | None, api_key_file: Path | None) -> str | None:
    """The API key from ``--api-key``, else ``--api-key-file``, else ``$SLM_API_KEY``.

    Raises:
        ConfigError: both flags given, an unreadable or empty key file, or a key with
            whitespace inside (it could never be sent in a header).
    """
    if api_key is not None and api_key_file is not None:
        raise ConfigError("Give either --api-key or --api-key-file, not both.")
    if api_key_file is not None:
        try:
            api_key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"Cannot read the API key file {api_key_file} ({e}); pass a "
                              "readable UTF-8 file that contains the key.") from None
        if not api_key:
            raise ConfigError(f"The API key file {api_key_file} is empty; write the key into "
                              "it.")
    elif api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    if api_key is not None:
        api_key = api_key.strip()
        if not api_key or any(c.isspace() for c in api_key):
            raise ConfigError("The API key is empty or contains whitespace; use a key of "
                              "printable characters without spaces.")
    return api_key
