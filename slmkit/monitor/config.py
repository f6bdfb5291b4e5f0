"""Options of ``slm monitor`` (pydantic only: the CLI builds its flags from this at start-up)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from slmkit.step import cli


class MonitorConfig(BaseModel):
    """Options of ``slm monitor``."""

    model_config = ConfigDict(extra="forbid")

    log: str = Field(description="The request log (SQLite) `slm serve --request-log` writes.",
                     json_schema_extra=cli(argument=True))
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
