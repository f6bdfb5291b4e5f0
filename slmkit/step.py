"""The step contract: one pydantic config per step, one ``run(cfg) -> StepResult``.

Every step of the lifecycle (``slm quantize``, the ``quantize`` recipe step and
``slmkit.compress.quantize.run_quantize`` in Python) is the same two things:

* a **config**, a pydantic model that owns every field's name, type, default, bounds and
  help. The CLI flags are generated from it (:mod:`slmkit.cli_options`), YAML recipe steps
  are validated by it, and the lineage records ``cfg.model_dump()``. Shared blocks live here
  and have one name and one default everywhere: :class:`StepConfig` (out, overwrite,
  threads), :class:`ModelStep` (+ the input model) and :class:`Calibration` (calib_data,
  calib_samples, calib_seq_len, seed);
* a **run function** ``run(cfg) -> StepResult`` that writes the output atomically and
  returns a :class:`StepResult`, which shows itself as the CLI's result table and gives the
  recipe runner its figures.

Field metadata for the CLI (positional argument, short flag, a flag name of its own) is
declared with :func:`cli` in ``json_schema_extra``; nothing about a flag is restated
elsewhere.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from slmkit.errors import ConfigError


def cli(*, argument: bool = False, short: str | None = None, flag: str | None = None,
        hidden: bool = False, metavar: str | None = None) -> dict[str, Any]:
    """CLI facts of a config field, for ``Field(json_schema_extra=cli(...))``.

    Args:
        argument: a positional argument instead of an option.
        short: a one-letter alias such as ``"-o"``.
        flag: the option's own spelling (``"--sym/--asym"``, ``"--json"``) instead of
            ``--field-name``.
        hidden: not offered on the command line (recipe / Python only).
        metavar: the placeholder shown in ``--help``.
    """
    return {"cli": {k: v for k, v in dict(argument=argument, short=short, flag=flag,
                                          hidden=hidden, metavar=metavar).items() if v}}


def refuse_unused(cfg: BaseModel, fields: set[str], where: str) -> None:
    """Refuse options the user set that ``where`` does not use (never ignore an input).

    Only explicitly given fields count (``model_fields_set``), so defaults never trip it.
    Raises ``ValueError``, for use inside a pydantic validator.
    """
    given = sorted(cfg.model_fields_set & fields)
    if given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        one = len(given) == 1
        raise ValueError(f"{flags} {'does' if one else 'do'} not apply to {where}; drop "
                         f"{'it' if one else 'them'}")


def _one_or_many(value: str | list[str]) -> str | list[str]:
    """A corpus given as a one-item list is the same corpus as the bare string."""
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    if isinstance(value, list) and not value:
        raise ValueError("give at least one corpus")
    return value


#: A corpus spec: ``stdlib``, a file, dir, glob or ``.jsonl``; several on the CLI by
#: repeating the flag.
Corpus = Annotated[str | list[str], AfterValidator(_one_or_many)]

CORPUS_HELP = ("Corpus: 'stdlib' (Python code), 'stdlib-prose' (English prose), a file, "
               "dir, glob or .jsonl (repeatable).")


class StepConfig(BaseModel):
    """What every step has: where it writes, whether it may replace that, and its threads."""

    model_config = ConfigDict(extra="forbid")

    out: str | None = Field(default=None, description="Output directory.",
                            json_schema_extra=cli(short="-o"))
    overwrite: bool = Field(default=False, description="Replace --out if it exists.")
    threads: int | None = Field(default=None, ge=1, description="CPU threads (default: "
                                "torch's, one per physical core).")

    def output(self) -> str:
        """The output directory; a step cannot run without one."""
        if not self.out:
            step = type(self).__name__.removesuffix("Config").lower()
            raise ConfigError(f"{step} needs an output directory; pass --out DIR.")
        return self.out

    def check_output(self) -> str:
        """The output directory, checked before any long work (exists without
        ``--overwrite``, an existing file, an unwritable parent); nothing is left behind."""
        from slmkit.models.io import discard_out_dir, prepare_out_dir

        _, tmp = prepare_out_dir(self.output(), self.overwrite)
        discard_out_dir(tmp)
        return self.output()

    def apply_threads(self) -> None:
        """Set torch's CPU threads when the step was given a number."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

    def lineage(self) -> dict[str, Any]:
        """The options recorded in ``slmkit.json``: everything but where the output went."""
        return self.model_dump(mode="json", exclude={"out", "overwrite", "resume"})


class ModelStep(StepConfig):
    """A step that reads one model: a local dir, a hub id, a GGUF file or a built-in name."""

    model: str = Field(description="Model directory, hub id, .gguf file or builtin name "
                       "(builtin:smollm2-135m).", json_schema_extra=cli(argument=True))


class Calibration(BaseModel):
    """The calibration block of every data-driven compression step (GPTQ, AWQ, Wanda,
    SparseGPT, ASVD, structured pruning): the corpus' train split, cut into
    ``calib_samples`` windows of ``calib_seq_len`` tokens (128 x 512, AWQ's and GPTQ's
    usual setting)."""

    model_config = ConfigDict(extra="forbid")

    calib_data: Corpus = Field(default_factory=lambda: ["stdlib", "stdlib-prose"],
                               description="Calibration corpora (train split; repeat the "
                               "flag for several, which share the windows equally): stdlib "
                               "(Python code), stdlib-prose (its docstrings and pydoc "
                               "topics), a file, dir, glob or .jsonl. Default: both stdlib "
                               "corpora, half code and half prose.")
    calib_samples: int = Field(default=128, ge=1, description="Calibration windows.")
    calib_seq_len: int = Field(default=512, ge=8, description="Tokens per calibration window.")
    seed: int = Field(default=0, description="Seed for the choice of calibration windows.")
    calib_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="Precision of the calibration forwards: bf16 "
        "(autocast matrix products; statistics stay fp32), fp32, or auto (bf16 where the CPU "
        "has native bf16 instructions).")


@dataclass
class Table:
    """An extra table a step shows before its summary (per-layer detail and the like)."""

    title: str
    rows: list[tuple[Any, ...]]
    header: tuple[str, ...] | None = None


@dataclass
class StepResult:
    """What a step did: its output, its figures and how to show them.

    Attributes:
        step: the step's name (``"quantize"``), the title of its table.
        out: where it wrote (None for steps that only measure).
        figures: flat numbers the recipe runner records and summarises (``ppl``, ``size_on_disk``).
        rows: the CLI's result table, key/value pairs in display order.
        tables: more tables shown before ``rows``.
        data: what ``--json`` prints (default: figures and out).
        notes: dim lines printed after the table.
    """

    step: str
    out: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, Any]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    data: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def numbers(self) -> dict[str, float | int]:
        """The numeric figures (what a recipe's state file keeps)."""
        return {k: v for k, v in self.figures.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def to_json(self) -> str:
        payload = self.data if self.data is not None else {**self.figures, "out": self.out}
        return json.dumps(payload, indent=2, default=str) + "\n"

    def show(self, as_json: bool = False, title: str | None = None) -> None:
        """Print the result: its tables then its summary, or JSON on stdout."""
        if as_json:
            sys.stdout.write(self.to_json())
            return
        from slmkit.console import console, print_table

        for t in self.tables:
            print_table(t.title, t.rows, header=t.header)
        if self.rows:
            print_table(title or f"slm {self.step}", self.rows)
        for note in self.notes:
            console.print(f"[dim]{note}[/dim]", highlight=False)
