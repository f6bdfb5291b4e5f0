"""``FederateConfig``: the one configuration of ``slm federate`` (no torch, no flwr import).

The server sends this config, as JSON, to every client in the Flower run config, so a
client trains with exactly the options the user gave; each client adds only where its own
data is (its SuperNode's ``--node-config data=...``).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from slmkit.step import StepConfig, cli, refuse_unused

#: ``--superlink`` address: host:port (a name, an IPv4 address or a bracketed IPv6 one).
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


class FederateConfig(StepConfig):
    """Options of ``slm federate``: LoRA / QLoRA fine-tuning where each client trains on its
    own data in the one training loop and sends only its adapter to the server.

    Two modes, the same client and server code (Flower apps):

    * simulation (``--clients``): slmkit starts a Flower SuperLink and one SuperNode per
      client as processes on this machine (loopback only), runs the rounds, stops them;
    * deployment (``--superlink HOST:PORT``): the SuperLink and the SuperNodes run where
      the user started them (each SuperNode with its own ``--node-config data=...``).
    """

    model: str = Field(description="Model to adapt (model dir, hub id, .gguf file or "
                       "builtin:smollm2-135m); every client loads its own copy.",
                       json_schema_extra=cli(argument=True))
    clients: list[str] | None = Field(
        default=None, description="Simulation: one client per item, each its own task "
        "JSONL, data dir or built-in task (comma-separated or repeated); NAME=SPEC names a "
        "client. 'split:TASK:N' is the built-in non-IID demo: a built-in task split by "
        "stdlib package over N clients.")
    superlink: str | None = Field(
        default=None, description="Deployment: address HOST:PORT of a running Flower "
        "SuperLink whose SuperNodes hold the clients' data.")
    rounds: int = Field(default=3, ge=1, description="Federated rounds.")
    local_steps: int = Field(default=10, ge=1, description="Optimizer steps each client "
                             "takes per round.")
    min_clients: int | None = Field(default=None, ge=1, description="Fewest clients whose "
                                    "updates a round needs (default: all in simulation, 2 "
                                    "in deployment); clients that drop out are skipped.")
    aggregation: Literal["fedavg", "exact"] = Field(
        default="fedavg", description="fedavg (average A and B separately, FlowerTune's "
        "way) or exact (the average of the products B·A: FedAvg plus the residual folded "
        "into the frozen base, FedEx-LoRA).")
    round_timeout: float = Field(default=600.0, gt=0, description="Seconds a round waits for "
                                 "client updates before going on without the late ones.")

    method: Literal["lora", "qlora"] = Field(default="lora", description="lora (adapters "
                                             "over the fp32 base) or qlora (over a 4-bit "
                                             "RTN base).")
    rank: int = Field(default=8, ge=1, description="LoRA rank r.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA alpha (update scale alpha/r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | None = Field(
        default=None, description="Module names to adapt, comma-separated or repeated "
        "(default: all attention and MLP projections).")
    template: Literal["auto", "chat", "plain"] = Field(
        default="auto", description="chat, plain or auto (plain for built-in tasks).")
    max_samples: int | None = Field(default=None, ge=1, description="Use at most this many "
                                    "samples per client.")
    seq_len: int = Field(default=256, ge=8, description="Context per sample.")
    batch_size: int = Field(default=8, ge=1, description="Samples per micro-batch.")
    lr: float = Field(default=1e-3, gt=0, description="Client learning rate (constant "
                      "after warm-up within each round).")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps of each "
                              "client's round.")
    eval_data: str | None = Field(default=None, description="Held-out task JSONL (or "
                                  "built-in task) the server scores the global adapter on "
                                  "after every round.")

    dp_clip: float | None = Field(default=None, gt=0, description="DP-FedAvg: clip each "
                                  "client's update to this L2 norm and add Gaussian noise.")
    dp_noise: float | None = Field(default=None, gt=0, description="DP noise multiplier "
                                   "(noise std = multiplier x clip / clients).")
    dp_epsilon: float | None = Field(default=None, gt=0, description="DP: pick the noise "
                                     "multiplier that spends this epsilon over --rounds.")
    dp_delta: float = Field(default=1e-5, gt=0, lt=1, description="DP: the delta epsilon is "
                            "reported at.")

    seed: int = Field(default=0, description="Seed for the adapters and data order.")
    resume: bool = Field(default=False, description="Continue from the last round saved in "
                         "--out.")

    @field_validator("clients", "target_modules")
    @classmethod
    def _split(cls, v: list[str] | None) -> list[str] | None:
        """``["a.jsonl,b.jsonl"]`` (the CLI's comma form) -> ``["a.jsonl", "b.jsonl"]``."""
        if v is None:
            return v
        items = [t.strip() for item in v for t in item.split(",") if t.strip()]
        if not items:
            raise ValueError("give at least one item")
        return items

    @field_validator("superlink")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            m = _ADDRESS.match(v)
            if not m or not 0 < int(m.group(2)) < 65536:
                raise ValueError(f"'{v}' is not HOST:PORT, e.g. 192.168.1.10:9091")
        return v

    @model_validator(mode="after")
    def _mode(self) -> "FederateConfig":
        if (self.clients is None) == (self.superlink is None):
            raise ValueError("give either --clients (simulation on this machine) or "
                             "--superlink HOST:PORT (a running federation), not "
                             f"{'both' if self.clients else 'neither'}")
        if self.min_clients and self.clients and self.min_clients > len(self.clients):
            raise ValueError(f"--min-clients {self.min_clients} exceeds the "
                             f"{len(self.clients)} --clients; lower it")
        if self.dp_clip is None:
            refuse_unused(self, {"dp_noise", "dp_epsilon", "dp_delta"}, "training without "
                          "--dp-clip")
        else:
            if (self.dp_noise is None) == (self.dp_epsilon is None):
                raise ValueError("--dp-clip needs exactly one of --dp-noise (a noise "
                                 "multiplier) or --dp-epsilon (a privacy budget)")
            if self.aggregation != "fedavg":
                raise ValueError("DP-FedAvg clips and noises FedAvg's average; use "
                                 "--aggregation fedavg with --dp-clip")
        return self

    @property
    def simulated(self) -> bool:
        return self.clients is not None

    def needed_clients(self) -> int:
        """Fewest successful client updates a round needs."""
        if self.min_clients:
            return self.min_clients
        return len(self.clients) if self.clients else 2
