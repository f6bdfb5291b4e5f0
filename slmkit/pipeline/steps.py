"""The steps: each is one pydantic config and one ``run(cfg) -> StepResult``.

This table is the one list of steps. The CLI generates a verb from each entry (its flags
from the config's fields) and the recipe runner validates and runs recipe steps with the
same config and the same function, so ``slm quantize --bits 4`` and a recipe step
``{step: quantize, bits: 4}`` are the same call. Entries are ``"module:name"`` strings,
imported on first use so that ``slm --help`` does not import torch.

A recipe sets the config's ``out`` to the step's directory; a config with a ``resume``
field (the training steps) is resumed after an interruption.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class StepKind:
    """How to validate and run one kind of step."""

    config: str            # "module:PydanticModel"
    run: str               # "module:function" taking the validated config
    description: str = ""

    def config_class(self):
        return _resolve(self.config)

    def run_function(self) -> Callable[[Any], Any]:
        return _resolve(self.run)

    @property
    def resumable(self) -> bool:
        return "resume" in self.config_class().model_fields


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


#: Step kinds available in this version. Names follow the CLI verbs.
STEP_KINDS: dict[str, StepKind] = {
    "init": StepKind("slmkit.models.presets:InitConfig", "slmkit.models.presets:run_init",
                     "a randomly initialised model from a preset"),
    "tokenizer": StepKind("slmkit.models.tokenizer:TokenizerConfig",
                          "slmkit.models.tokenizer:run_tokenizer",
                          "a byte-level BPE tokenizer trained on a corpus"),
    "train": StepKind("slmkit.train.config:TrainConfig", "slmkit.train.run:run_train",
                      "pretraining with the LM objective"),
    "distill": StepKind("slmkit.train.distill:DistillConfig", "slmkit.train.distill:run_distill",
                        "knowledge distillation into a student"),
    "finetune": StepKind("slmkit.train.finetune:FinetuneConfig",
                         "slmkit.train.finetune:run_finetune",
                         "LoRA / QLoRA / full fine-tuning on a task JSONL"),
    "augment": StepKind("slmkit.train.augment:AugmentConfig", "slmkit.train.augment:run_augment",
                        "a task set expanded by a teacher model, filtered"),
    "quantize": StepKind("slmkit.compress.quantize.config:QuantizeConfig",
                         "slmkit.compress.quantize.api:run_quantize",
                         "RTN / GPTQ / AWQ weight quantization"),
    "prune": StepKind("slmkit.compress.prune.config:PruneConfig",
                      "slmkit.compress.prune.api:run_prune",
                      "unstructured, N:M or structured pruning"),
    "factorize": StepKind("slmkit.compress.factorize.config:FactorizeConfig",
                          "slmkit.compress.factorize.api:run_factorize",
                          "SVD / activation-aware SVD low-rank factorization"),
    "search": StepKind("slmkit.search.config:SearchConfig", "slmkit.search.run:run_search",
                       "per-layer compression searched under size / speed budgets"),
    "eval": StepKind("slmkit.eval.evaluate:EvalConfig", "slmkit.eval.evaluate:run_eval",
                     "one model's perplexity, task scores and speed (results.json)"),
    "compare": StepKind("slmkit.eval.compare:CompareConfig", "slmkit.eval.compare:run_compare",
                        "side-by-side evaluation report of several models"),
    "export": StepKind("slmkit.export.step:ExportConfig", "slmkit.export.step:run_export",
                       "GGUF (llama.cpp, Ollama) or ONNX export"),
    "import": StepKind("slmkit.models.gguf_import:ImportConfig",
                       "slmkit.models.gguf_import:run_import",
                       "a GGUF file (or a built-in model) as a Hugging Face model dir"),
    "federate": StepKind("slmkit.federated.config:FederateConfig",
                         "slmkit.federated.launch:run_federate",
                         "federated LoRA / QLoRA fine-tuning on Flower"),
}

#: Step kinds the recipe format reserves for verbs that a later slmkit version adds.
PLANNED: tuple[str, ...] = ()
