"""The recipe step kinds: each maps to the same pydantic config and library call as its verb.

A step kind is registered as ``"module:ConfigClass"`` and ``"module:run_function"``. The
runner sets the config's output field to the step's directory, so recipes never name
outputs; they refer to earlier steps by name (``model: ${teacher}``).

``run_function(config) -> dict`` writes the step's output (atomically) and returns the
figures it measured, which appear in the run's summary table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class StepKind:
    """How to validate and run one kind of recipe step."""

    config: str            # "module:PydanticModel"
    run: str               # "module:function" taking the validated config
    out_field: str = "out"  # config field that receives the step's output directory
    resumable: bool = False  # the run function accepts resume=True after an interruption
    description: str = ""

    def config_class(self):
        return _resolve(self.config)

    def run_function(self) -> Callable[..., dict[str, Any] | None]:
        return _resolve(self.run)


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


#: Step kinds available in this version. Names follow the CLI verbs.
STEP_KINDS: dict[str, StepKind] = {
    "init": StepKind("slmkit.models.presets:InitConfig", "slmkit.models.presets:run_init",
                     description="a randomly initialised model from a preset"),
    "tokenizer": StepKind("slmkit.pipeline.adapters:TokenizerStep",
                          "slmkit.pipeline.adapters:run_tokenizer",
                          description="a byte-level BPE tokenizer trained on a corpus"),
    "train": StepKind("slmkit.train.config:TrainConfig", "slmkit.train.run:run_train",
                      resumable=True, description="pretraining with the LM objective"),
    "distill": StepKind("slmkit.train.distill:DistillConfig", "slmkit.train.distill:run_distill",
                        resumable=True, description="knowledge distillation into a student"),
    "finetune": StepKind("slmkit.train.finetune:FinetuneConfig",
                         "slmkit.train.finetune:run_finetune", resumable=True,
                         description="LoRA / QLoRA / full fine-tuning on a task JSONL"),
    "augment": StepKind("slmkit.train.augment:AugmentConfig", "slmkit.train.augment:run_augment",
                        description="a task set expanded by a teacher model, filtered"),
    "quantize": StepKind("slmkit.pipeline.adapters:QuantizeStep",
                         "slmkit.pipeline.adapters:run_quantize",
                         description="RTN / GPTQ / AWQ weight quantization"),
    "prune": StepKind("slmkit.compress.prune.api:PruneConfig", "slmkit.compress.prune.api:run_prune",
                      description="unstructured, N:M or structured pruning"),
    "factorize": StepKind("slmkit.compress.factorize.api:FactorizeConfig",
                          "slmkit.compress.factorize.api:run_factorize",
                          description="SVD / activation-aware SVD low-rank factorization"),
    "eval": StepKind("slmkit.pipeline.adapters:EvalStep", "slmkit.pipeline.adapters:run_eval",
                     description="one model's perplexity, task scores and speed (results.json)"),
    "compare": StepKind("slmkit.pipeline.adapters:CompareStep",
                        "slmkit.pipeline.adapters:run_compare",
                        description="side-by-side evaluation report of several models"),
    "export": StepKind("slmkit.pipeline.adapters:ExportStep",
                       "slmkit.pipeline.adapters:run_export",
                       description="GGUF (llama.cpp, Ollama) or ONNX export"),
}

#: Step kinds the recipe format reserves for verbs that a later slmkit version adds.
PLANNED: tuple[str, ...] = ()
