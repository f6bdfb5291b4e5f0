"""Options of ``slm monitor`` (pydantic only: the CLI builds its flags from this at start-up)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from slmkit.step import cli


class MonitorConfig(BaseModel):
    """Options of ``slm monitor``."""

    model_config = ConfigDict(extra="forbid")

    log: str = Field(description="The request log (SQLite) `slm serve --request-log` writes, "
                     "or a model (dir, .gguf, builtin:NAME) to answer --prompts offline.",
                     json_schema_extra=cli(argument=True))
    prompts: str | None = Field(default=None, description="With a MODEL: the requests to "
                                "answer and score, a text file (one per line) or JSONL; the "
                                "first --reference are the reference window unless "
                                "--reference-file.")
    max_tokens: int = Field(default=64, ge=1, le=4096, description="With a MODEL: tokens per "
                            "answer (greedy).")
    save_log: str | None = Field(default=None, description="With a MODEL: keep the request "
                                 "log it writes at this path (default: a temporary file).")
    out: str | None = Field(default=None, description="HTML report to write (default: none).",
                            json_schema_extra=cli(short="-o"))
    reference: int = Field(default=100, ge=5, description="The first N requests are the "
                           "reference window.")
    reference_file: str | None = Field(default=None, description="Typical prompts instead: a "
                                       "text file (one per line) or JSONL.")
    window: int = Field(default=200, ge=5, description="The last N requests are the recent "
                        "window.")
    alpha: float = Field(default=0.001, gt=0, lt=1, description="A signal drifts at p-value "
                         "<= alpha.")
    prometheus: str | None = Field(default=None, description="Also write the gauges to this "
                                   "file (node_exporter textfile format).")
