"""Typed settings of ``slm serve`` (one pydantic model shared by the CLI and the app)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from slmkit.errors import ConfigError

#: Environment variable read for the API key when neither --api-key nor --api-key-file is set.
API_KEY_ENV = "SLM_API_KEY"


class ServeConfig(BaseModel):
    """Everything the server needs besides the model.

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
        max_seq_len: prompt + output tokens per request (None = model context, <= 2048).
        threads: torch threads of the engine (None = physical cores).
        kv_cache: KV cache dtype: auto (fp16 for quantized fp32 models, else the model's
            dtype), fp32, fp16, bf16 or int8.
        log_prompts: put prompt text in the per-request log line (off for privacy).
        max_request_bytes: largest request body accepted (413 above it, refused before
            reading when ``Content-Length`` declares more); 4 MiB is far above any prompt
            a small model's context holds.
    """

    name: str = "slm"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    cors_origins: list[str] = Field(default_factory=list)
    max_concurrency: int = Field(8, ge=1, le=256)
    max_queue: int = Field(64, ge=0)
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_tokens_cap: int | None = Field(None, ge=1)
    default_max_tokens: int = Field(256, ge=1)
    request_timeout: float = Field(300.0, gt=0)
    shutdown_timeout: float = Field(10.0, ge=0)
    max_seq_len: int | None = Field(None, ge=2)
    threads: int | None = Field(None, ge=1)
    kv_cache: Literal["auto", "fp32", "fp16", "bf16", "int8"] = "auto"
    log_prompts: bool = False
    max_request_bytes: int = Field(4 << 20, ge=1024)


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
