"""Options of SLM <-> LLM routing: the server's ``--fallback`` block and ``slm route VERB``.

Light to import (pydantic only): the CLI builds its flags from these classes.

* :class:`RouteOptions` -- the fields ``slm serve`` gains (``ServeConfig`` inherits them):
  where the bigger model is, how a request is decided (cascade or router), the threshold,
  retries, deadline and price.
* :class:`TrainConfig` -- ``slm route train``: fit a router for one model pair.
* :class:`CalibrateConfig` -- ``slm route calibrate``: pick the threshold meeting a target.
* :class:`EvalConfig` -- ``slm route eval``: quality vs share forwarded for cascade, router
  and random routing on a task set, with RouteLLM's APGR.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from slmkit.step import StepConfig, cli

#: Decision modes. cascade: answer locally, escalate a low-scored answer; router: decide
#: from the prompt; local / fallback: always one side (per-request overrides, tests).
Mode = Literal["cascade", "router", "local", "fallback"]
#: Cascade scores from the local answer's token log-probabilities (higher = more sure).
Signal = Literal["mean", "min", "q05", "q10", "q25", "q50", "entropy", "max_entropy", "flag"]

#: Threshold per cascade signal when none is given (escalate below it). Rough defaults
#: for a 100M-class model; ``slm route calibrate`` picks one for a target share.
DEFAULT_THRESHOLDS = {"mean": -1.0, "min": -4.0, "q05": -3.5, "q10": -2.5, "q25": -1.2,
                      "q50": -0.4, "entropy": -1.5, "max_entropy": -4.0, "flag": 0.5}


class RouteOptions(BaseModel):
    """The hybrid block of ``slm serve``: one endpoint over the local and a bigger model."""

    fallback: str | None = Field(None, description="Base URL of a bigger OpenAI-compatible "
                                 "server (another slm serve, llama.cpp, Ollama, a cloud API), "
                                 "e.g. http://127.0.0.1:8001/v1; requests are routed between "
                                 "it and the local model.")
    fallback_model: str | None = Field(None, description="Model id sent to the fallback "
                                       "(default: the first one its /v1/models lists).")
    fallback_key_env: str | None = Field(None, description="Environment variable holding the "
                                         "fallback's API key (sent as a Bearer token, never "
                                         "logged).")
    route_mode: Mode = Field("cascade", description="cascade (answer locally, forward when "
                             "the answer's score is below the threshold), router (decide from "
                             "the prompt with --router), local or fallback (always one side). "
                             "A request may pick its own with \"route\".")
    route_signal: Signal = Field("mean", description="Cascade score from the local answer's "
                                 "token log-probs: mean, min, q05/q10/q25/q50 (quantiles), "
                                 "entropy (minus the mean entropy), max_entropy (minus the "
                                 "largest), flag (1 - the monitor's hallucination risk).")
    route_threshold: float | None = Field(None, description="Forward when the score is below "
                                          "this (default: the router's calibrated threshold, "
                                          "or a per-signal default for cascade).")
    router: str | None = Field(None, description="Router directory from `slm route train` "
                               "(needed by --route-mode router).")
    route_send_draft: bool = Field(False, description="Cascade: give the local draft to the "
                                   "big model as a previous answer to improve (chat only).")
    fallback_timeout: float = Field(60.0, gt=0, description="Seconds the fallback gets per "
                                    "request, retries included, before the local answer is "
                                    "returned (flagged).")
    fallback_retries: int = Field(2, ge=0, le=10, description="Retries of a failed forward "
                                  "(connection error, 429 or 5xx), with exponential backoff.")
    fallback_price: float = Field(0.0, ge=0, description="Price per forwarded token (prompt + "
                                  "completion) for the cost counter in /metrics.")

    @model_validator(mode="after")
    def _needs_fallback(self):
        if self.fallback is None:
            # compared with the defaults, not fields_set: ServeCommand re-validates its dump
            given = sorted(n for n, f in RouteOptions.model_fields.items()
                           if n != "fallback" and getattr(self, n) != f.default)
            if given:
                flags = ", ".join("--" + n.replace("_", "-") for n in given)
                raise ValueError(f"{flags} {'applies' if len(given) == 1 else 'apply'} only "
                                 "with --fallback URL (a bigger model to route to); add it "
                                 "or drop them")
            return self
        if not self.fallback.startswith(("http://", "https://")):
            raise ValueError(f"--fallback {self.fallback!r} is not an http(s) URL; pass the "
                             "bigger server's base URL, e.g. http://127.0.0.1:8001/v1")
        if self.route_mode == "router" and not self.router:
            raise ValueError("--route-mode router needs --router DIR (a router from "
                             "`slm route train`)")
        return self


class TrainConfig(StepConfig):
    """Options of ``slm route train``."""

    model: str = Field(description="The local (small) model the router will serve with "
                       "(dir, hub id, .gguf or builtin name).",
                       json_schema_extra=cli(argument=True))
    data: str = Field(description="JSONL of prompts: 'prompt' (or 'messages') and either "
                      "'label' (1 = needs the big model, 0 = the small one does) or both "
                      "models' scores 'small_score' and 'big_score' (RouteLLM's way).")
    out: str = Field(description="Router directory to write.", json_schema_extra=cli(short="-o"))
    features: Literal["hidden", "minilm"] = Field("hidden", description="hidden: the local "
                                                  "model's own hidden states (no other model); "
                                                  "minilm: the RAG embedder.")
    layers: int = Field(0, ge=0, description="hidden: decoder layers run before pooling (0 = "
                        "the token embeddings: about a millisecond, and as good as 2 layers in "
                        "bench/routing.py; each layer costs about 1/L of a prefill).")
    margin: float = Field(0.0, ge=0, description="With scores: label 1 when big_score - "
                          "small_score > margin.")
    l2: float = Field(1.0, ge=0, description="L2 penalty of the logistic regression.")
    max_tokens: int = Field(128, ge=8, le=2048, description="Prompt tokens read (the last "
                            "ones).")
    target_share: float = Field(0.5, gt=0, lt=1, description="The router's default threshold "
                                "forwards this share of the training prompts.")
    seed: int = Field(0, description="Seed of the held-out split.")


class CalibrateConfig(BaseModel):
    """Options of ``slm route calibrate``."""

    scores: str = Field(description="Calibration JSONL: one row per request with 'score' "
                        "(from `slm route eval --out` or the server's slm_route field) and, "
                        "for a quality target, 'small_quality' and 'big_quality'.",
                        json_schema_extra=cli(argument=True))
    signal: str | None = Field(None, description="Read this column of the rows' 'scores' "
                               "(a cascade signal or 'router', as `slm route eval` writes) "
                               "instead of 'score'.")
    check: str | None = Field(None, description="A second JSONL (another traffic mix): report "
                              "the share forwarded and quality there at the chosen threshold.")
    target_share: float | None = Field(None, gt=0, lt=1, description="Forward this share of "
                                       "requests.")
    target_quality: float | None = Field(None, gt=0, le=1, description="Reach this fraction "
                                         "of the big model's quality with the fewest "
                                         "forwards (needs quality columns).")

    @model_validator(mode="after")
    def _one_target(self):
        if (self.target_share is None) == (self.target_quality is None):
            raise ValueError("give exactly one of --target-share and --target-quality")
        return self


class EvalConfig(StepConfig):
    """Options of ``slm route eval``."""

    small: str = Field(description="The local (small) model.", json_schema_extra=cli(argument=True))
    big: str = Field(description="The bigger model (dir, builtin name), or an http(s) URL of "
                     "a running OpenAI-compatible server.", json_schema_extra=cli(argument=True))
    tasks: list[str] = Field(default_factory=lambda: ["stdlib-funcname", "stdlib-nextline"],
                             description="Generation task sets (built-in stdlib task names or "
                             "JSONL files; repeatable).")
    limit: int = Field(60, ge=4, description="Items per task (validation split).")
    signals: list[Signal] = Field(default_factory=lambda: ["mean", "min", "q10", "entropy"],
                                  description="Cascade signals to compare (repeatable).")
    layers: list[int] = Field(default_factory=lambda: [0, 2], description="Router features: "
                              "decoder layers of the small model (see slm route train); one "
                              "router per value (repeatable).")
    folds: int = Field(5, ge=2, le=20, description="Cross-validation folds of the router "
                       "(each item is scored by a router that never saw it).")
    seed: int = Field(0, description="Seed of the folds and of random routing.")
    decisions: int = Field(1000, ge=10, description="Router decisions timed per router "
                           "(5 ms apart, as requests arrive; then as many back to back).")
    out: str | None = Field(None, description="Write results.json and per-item scores.jsonl "
                            "(the input of slm route calibrate) here.",
                            json_schema_extra=cli(short="-o"))


#: ``slm route VERB``: (config, "module:run function", help). The CLI registers these.
ROUTE_VERBS = {
    "train": (TrainConfig, "slmkit.route.router:run_train", "Train a prompt router for a "
              "model pair: a logistic classifier on the small model's hidden states (or "
              "MiniLM embeddings)."),
    "calibrate": (CalibrateConfig, "slmkit.route.calibrate:run_calibrate", "Pick the "
                  "threshold that meets a target share forwarded or quality, and check how "
                  "far the share moves on a second set."),
    "eval": (EvalConfig, "slmkit.route.evaluate:run_eval", "Quality vs share forwarded for "
             "cascade, router and random routing on a task set (APGR, share at 95%)."),
}
