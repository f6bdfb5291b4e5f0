"""Options of ``slm generate`` and ``slm chat``: one sampling block, two verb configs.

Light to import (pydantic only): the CLI builds its flags from these classes. The engine
itself takes :class:`~slmkit.engine.sampling.SamplingParams`; :meth:`SamplingOptions.params`
makes one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slmkit.step import cli


class SamplingOptions(BaseModel):
    """How a reply is sampled (the engine's ``SamplingParams``, validated)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model directory or hub id.",
                       json_schema_extra=cli(argument=True))
    max_tokens: int = Field(default=128, ge=1, description="New tokens at most (prompt + new "
                            "tokens must fit the context).", json_schema_extra=cli(short="-n"))
    temperature: float = Field(default=0.8, ge=0, description="0 = greedy.",
                               json_schema_extra=cli(short="-t"))
    top_k: int = Field(default=0, ge=0, description="Keep the k most likely tokens (0 = off).")
    top_p: float = Field(default=0.95, gt=0, le=1, description="Nucleus mass (1 = off).")
    min_p: float = Field(default=0.0, ge=0, lt=1, description="Drop tokens below min_p * "
                         "p_max.")
    repetition_penalty: float = Field(default=1.0, gt=0, description="1 = off.")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    dtype: Literal["fp32", "bf16"] = Field(default="fp32", description="fp32 or bf16.")
    threads: int | None = Field(default=None, ge=1, description="CPU threads (default: "
                                "physical cores).")

    def params(self, **extra):
        from slmkit.engine import SamplingParams

        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, seed=self.seed,
                              **extra)


class GenerateConfig(SamplingOptions):
    """Options of ``slm generate``."""

    prompt: str = Field(description="The text to continue.",
                        json_schema_extra=cli(argument=True))
    stop: list[str] = Field(default_factory=list, description="Stop string (repeatable).")
    ignore_eos: bool = Field(default=False, description="Do not stop at end-of-text.")
    chat: bool = Field(default=False, description="Wrap the prompt in the chat template as "
                       "one user message.")
    json_schema: Path | None = Field(default=None, description="JSON schema file: the output "
                                     "is one JSON value valid under it (constrained decoding).")
    draft: str | None = Field(default=None, description="Speculative decoding: 'ngram' "
                              "(prompt lookup) or a draft model dir sharing the tokenizer "
                              "(e.g. a distilled student); the output follows the model's "
                              "own distribution, greedy output is unchanged.")

    @field_validator("json_schema")
    @classmethod
    def _schema_file(cls, v: Path | None) -> Path | None:
        if v is None:
            return v
        try:
            schema = json.loads(Path(v).read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"cannot read {v} ({e.strerror}); give a JSON schema file") \
                from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{v} is not valid JSON ({getattr(e, 'msg', e)}); fix the file") \
                from None
        if not isinstance(schema, dict):
            raise ValueError(f"{v} holds a JSON {type(schema).__name__}, not a schema object")
        return v

    def grammar(self):
        """The :class:`~slmkit.engine.grammar.Grammar` of ``--json-schema`` (None without).

        Raises:
            GrammarError: the schema uses something the grammar cannot enforce.
        """
        if self.json_schema is None:
            return None
        from slmkit.engine.grammar import Grammar, GrammarError, check

        grammar = Grammar.json_schema(self.json_schema.read_text(encoding="utf-8"))
        try:
            check(grammar)
        except GrammarError as e:
            raise GrammarError(f"--json-schema {self.json_schema}: {e}") from None
        return grammar

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("'' would stop before the first token; pass a non-empty string")
        return v


class ChatConfig(SamplingOptions):
    """Options of ``slm chat``."""

    system: str | None = Field(default=None, description="System prompt.")
    max_tokens: int = Field(default=256, ge=1, description="Reply tokens at most.",
                            json_schema_extra=cli(short="-n"))
    temperature: float = Field(default=0.7, ge=0, description="0 = greedy.",
                               json_schema_extra=cli(short="-t"))
    repetition_penalty: float = Field(default=1.1, gt=0, description="1 = off.")
