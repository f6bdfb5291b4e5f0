"""The server's side of ``slm federate``: rounds, aggregation, privacy, checkpoints, output.

:func:`run_rounds` is the body of the ``ServerApp``. Each round it waits for enough
SuperNodes, sends them the global adapter through Flower's strategy (``FedAvg``, wrapped
by Flower's ``DifferentialPrivacyServerSideFixedClipping`` for DP-FedAvg, or
:class:`ExactLoRA`), waits up to ``--round-timeout`` for replies, leaves out clients that
crashed, dropped out or refused their data, aggregates the rest and checkpoints the
round in ``<out>/checkpoints/round-NNNN`` (``--resume`` continues from there). A round
with fewer than ``--min-clients`` updates stops the run with a sentence naming each
missing client; the last good round stays resumable.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): each client's update of the adapter is clipped to L2 norm ``C`` (``--dp-clip``),
the unweighted mean gets Gaussian noise of std ``z · C / n`` for ``n`` clients, which is
the Gaussian mechanism with noise multiplier ``z`` on a mean of sensitivity ``C / n``
(add/remove one client). The privacy spent, ε at ``--dp-delta``, is Opacus's RDP
accountant composed over the released rounds (sampling rate 1: every connected client
takes part, no amplification is claimed).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from slmkit.errors import SlmError
from slmkit.federated.aggregate import exact_update
from slmkit.federated.config import FederateConfig

__all__ = ["ExactLoRA", "run_rounds", "pack_residual", "unpack_residual", "dp_noise_for",
           "dp_epsilon"]


class FederationError(SlmError):
    """A federated run cannot go on (too few clients, none connected)."""


def pack_residual(residual: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{k}::{m}": t for k, (U, V) in residual.items() for m, t in (("U", U), ("V", V))}


def unpack_residual(flat: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    keys = {k.rsplit("::", 1)[0] for k in flat}
    return {k: (torch.as_tensor(flat[f"{k}::U"]), torch.as_tensor(flat[f"{k}::V"]))
            for k in keys}


class ExactLoRA(FedAvg):
    """FedAvg whose aggregate is the exact weighted mean of the products ``s B_k A_k``.

    The returned arrays are FedAvg's factors ``(Ā, B̄)``; :attr:`residual` carries, per
    layer, the low-rank factors of everything FedAvg leaves out, accumulated over rounds
    (see :mod:`slmkit.federated.aggregate`).
    """

    def __init__(self, scales: dict[str, float], residual=None, **kwargs):
        super().__init__(**kwargs)
        self.scales = scales
        self.residual: dict[str, tuple[torch.Tensor, torch.Tensor]] = residual or {}

    def aggregate_train(self, server_round, replies):
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        states = [m.content["arrays"].to_torch_state_dict() for m in valid]
        weights = [float(m.content["metrics"][self.weighted_by_key]) for m in valid]
        out = {}
        for key, s in self.scales.items():
            A_bar, B_bar, res = exact_update([st[f"{key}::A"] for st in states],
                                             [st[f"{key}::B"] for st in states], weights, s,
                                             self.residual.get(key))
            out[f"{key}::A"], out[f"{key}::B"], self.residual[key] = A_bar, B_bar, res
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord(out), metrics


def dp_noise_for(cfg: FederateConfig) -> float:
    """The noise multiplier: ``--dp-noise``, or the one that spends ``--dp-epsilon`` at
    ``--dp-delta`` over ``--rounds`` full-participation releases (Opacus, RDP)."""
    if cfg.dp_noise is not None:
        return cfg.dp_noise
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=cfg.dp_epsilon, target_delta=cfg.dp_delta,
                                      sample_rate=1.0, steps=cfg.rounds, accountant="rdp",
                                      epsilon_tolerance=0.01))


def dp_epsilon(noise: float, releases: int, delta: float) -> float:
    """ε at ``delta`` after ``releases`` Gaussian releases of multiplier ``noise`` (RDP)."""
    if releases == 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise, 1.0, releases)]
    return float(acc.get_epsilon(delta))


def _say(line: str) -> None:
    """A progress line; ``slm federate`` shows the ServerApp's lines marked [slmkit]."""
    print(f"[slmkit] {line}", flush=True)


def _wait_for_nodes(grid: Grid, needed: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of the {needed} SuperNodes needed "
                                  f"connected within {timeout:.0f} s; start more SuperNodes "
                                  "or lower --min-clients.")
        time.sleep(0.2)
    return nodes


def _strategy(cfg: FederateConfig, scales, residual, needed: int):
    kwargs = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=needed,
                  min_available_nodes=needed)
    if cfg.aggregation == "exact":
        return ExactLoRA(scales, residual, **kwargs)
    if cfg.dp_clip is None:
        return FedAvg(**kwargs)
    fedavg = FedAvg(weighted_by_key="unit-weight", **kwargs)
    return DifferentialPrivacyServerSideFixedClipping(fedavg, dp_noise_for(cfg), cfg.dp_clip,
                                                      num_sampled_clients=needed)


class _Checkpoints:
    """``<out>/checkpoints/round-NNNN/``: the global adapter, the residual, the history."""

    def __init__(self, out: Path):
        self.root = out / "checkpoints"

    def save(self, rnd: int, factors, residual, history: list[dict]) -> None:
        from safetensors.torch import save_file

        final = self.root / f"round-{rnd:04d}"
        tmp = self.root / f".round-{rnd:04d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in factors.items()}, tmp / "adapter.safetensors")
        save_file({k: v.contiguous() for k, v in pack_residual(residual).items()},
                  tmp / "residual.safetensors")
        (tmp / "state.json").write_text(json.dumps({"round": rnd, "history": history},
                                                   indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(self.root.glob("round-*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self):
        from safetensors.torch import load_file

        rounds = sorted(self.root.glob("round-*"))
        if not rounds:
            return None
        last = rounds[-1]
        state = json.loads((last / "state.json").read_text())
        return (state["round"], load_file(last / "adapter.safetensors"),
                unpack_residual(load_file(last / "residual.safetensors")), state["history"])


def _classify(replies: list[Message], names: dict[int, str]):
    """(valid replies, {client: why it is left out}) of one round."""
    valid, out = [], {}
    for m in replies:
        node = m.metadata.src_node_id
        if m.has_error():
            out[names.get(node, f"node {node}")] = f"failed ({m.error.reason})"
            continue
        client = m.content["client"] if "client" in m.content else ConfigRecord()
        if client.get("name"):
            names[node] = str(client["name"])
        if client.get("refused"):
            out[str(client["name"])] = f"refused: {client['refused']}"
        else:
            valid.append(m)
    return valid, out


def run_rounds(grid: Grid, cfg: FederateConfig) -> dict[str, Any]:
    """Run the federation's rounds and write ``cfg.out``; returns the run's figures."""
    from slmkit.federated.adapters import build_adapted, get_factors, scalings

    t_start = time.perf_counter()
    cfg.apply_threads()
    out = Path(cfg.out)
    ckpt = _Checkpoints(out)
    model, tok = build_adapted(cfg)
    factors, scales = get_factors(model), scalings(model)
    residual: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    history: list[dict] = []
    start = 0
    if cfg.resume and (saved := ckpt.latest()) is not None:
        start, factors, residual, history = saved
        _say(f"resuming after round {start}")
    eval_examples = None
    if cfg.eval_data:
        from slmkit.federated.local import load_examples

        eval_examples = load_examples(cfg, cfg.eval_data, tok)
    needed = cfg.needed_clients()
    noise = dp_noise_for(cfg) if cfg.dp_clip else None
    strategy = _strategy(cfg, scales, residual, needed)
    names: dict[int, str] = {}
    if eval_examples is not None and start == 0:
        history_eval0 = _evaluate(model, tok, eval_examples, cfg, factors, residual)
    else:
        history_eval0 = None
    for rnd in range(start + 1, cfg.rounds + 1):
        t0 = time.perf_counter()
        nodes = _wait_for_nodes(grid, needed, cfg.round_timeout)
        if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping):
            strategy.num_sampled_clients = len(nodes)
        arrays = ArrayRecord({k: v for k, v in factors.items()})
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        down = arrays.count_bytes()
        if residual:
            res_record = ArrayRecord(pack_residual(residual))
            down += res_record.count_bytes()
            for m in messages:
                m.content["residual"] = res_record
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        answered = {m.metadata.src_node_id for m in replies}
        valid, left_out = _classify(replies, names)
        for node in {m.metadata.dst_node_id for m in messages} - answered:
            left_out[names.get(node, f"node {node}")] = \
                f"no reply within --round-timeout {cfg.round_timeout:g} s"
        if len(valid) < needed:
            why = "; ".join(f"{k}: {v}" for k, v in sorted(left_out.items())) or "none replied"
            raise FederationError(f"round {rnd} got {len(valid)} client updates, fewer than "
                                  f"the {needed} needed (--min-clients) ({why}); fix those "
                                  "clients and continue with --resume.")
        if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping):
            strategy.num_sampled_clients = len(valid)     # noise z·C/n for this mean
        agg, metrics = strategy.aggregate_train(rnd, valid)
        factors = agg.to_torch_state_dict()
        if isinstance(strategy, ExactLoRA):
            residual = strategy.residual
        record = {"round": rnd, "clients": sorted(str(m.content["client"]["name"])
                                                  for m in valid),
                  "left_out": left_out,
                  "train_loss": float(metrics["train-loss"]) if metrics else None,
                  "upload_bytes_per_client": int(valid[0].content["metrics"]["upload-bytes"]),
                  "download_bytes_per_client": int(down),
                  "client_seconds": max(float(m.content["metrics"]["handler-seconds"])
                                        for m in valid),
                  "client_train_seconds": max(float(m.content["metrics"]["seconds"])
                                              for m in valid),
                  "client_peak_rss_mb": max(float(m.content["metrics"]["peak-rss-mb"])
                                            for m in valid),
                  "residual_rank": max((U.shape[1] for U, _ in residual.values()), default=0)}
        if noise is not None:
            record["dp_epsilon"] = dp_epsilon(noise, rnd, cfg.dp_delta)
        if eval_examples is not None:
            record["eval_loss"] = _evaluate(model, tok, eval_examples, cfg, factors, residual)
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        ckpt.save(rnd, factors, residual, history)
        _say(f"round {rnd}/{cfg.rounds}: {len(valid)} clients, train loss "
             f"{record['train_loss']:.4f}"
             + (f", eval loss {record['eval_loss']:.4f}" if "eval_loss" in record else "")
             + (f", left out: {', '.join(left_out)}" if left_out else ""))
    return _write_output(cfg, model, tok, factors, residual, history, noise, history_eval0,
                         time.perf_counter() - t_start)


def _evaluate(model, tok, examples, cfg, factors, residual) -> float:
    from slmkit.federated.adapters import attach_residual, set_factors
    from slmkit.federated.local import heldout_loss

    set_factors(model, factors)
    hooks = attach_residual(model, residual)
    try:
        return heldout_loss(model, tok, examples, cfg)
    finally:
        for h in hooks:
            h.remove()


def _write_output(cfg, model, tok, factors, residual, history, noise, eval0, seconds):
    """Write ``out``: the merged dense model (+ ``adapter/``, a peft adapter, for LoRA) with
    the rounds in its lineage, ``checkpoints/`` moved in; one rename."""
    from slmkit.federated.adapters import factor_bytes, merge_dense, set_factors
    from slmkit.models import save_model
    from slmkit.models.io import commit_out_dir

    out = Path(cfg.out)
    adapter_bytes = factor_bytes(factors)
    last = history[-1] if history else {}
    metrics = {"rounds": len(history), "adapter_bytes": adapter_bytes,
               "upload_bytes_per_client_round": last.get("upload_bytes_per_client"),
               "final_train_loss": last.get("train_loss"),
               "eval_loss_start": eval0, "eval_loss": last.get("eval_loss"),
               "server_seconds": seconds, "residual_rank": last.get("residual_rank"),
               "round_history": history}
    if noise is not None:
        metrics |= {"dp_noise_multiplier": noise, "dp_clip": cfg.dp_clip,
                    "dp_delta": cfg.dp_delta, "dp_epsilon": last.get("dp_epsilon"),
                    "dp_accountant": "opacus RDP, sampling rate 1"}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    staging = out.parent / f".{out.name}.final-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    params = cfg.lineage()
    set_factors(model, factors)
    if cfg.method == "lora":
        adapter = _adapter_model(cfg, model, factors, residual)
        save_model(adapter, tok, staging / "adapter", step="federate", params=params,
                   metrics=metrics)
        set_factors(model, factors)
    merged = merge_dense(model, cfg, residual)
    staging_model = out.parent / f".{out.name}.model-{os.getpid()}"
    save_model(merged, tok, staging_model, step="federate", params=params, metrics=metrics)
    if (staging / "adapter").is_dir():
        os.replace(staging / "adapter", staging_model / "adapter")
    shutil.rmtree(staging, ignore_errors=True)
    ck_root = out / "checkpoints"
    try:
        if ck_root.is_dir():
            os.replace(ck_root, staging_model / "checkpoints")
        commit_out_dir(staging_model, out)
    except BaseException:
        if (staging_model / "checkpoints").is_dir() and not ck_root.exists():
            out.mkdir(parents=True, exist_ok=True)
            os.replace(staging_model / "checkpoints", ck_root)
        shutil.rmtree(staging_model, ignore_errors=True)
        raise
    return {k: v for k, v in metrics.items() if k != "round_history"} | {"history": history}


def _adapter_model(cfg, model, factors, residual):
    """The peft adapter to save: the global one, or (exact aggregation with a residual) one
    adapter of the stacked rank whose ``B' A'`` is the whole update, scale 1."""
    if not residual:
        return model
    from slmkit.federated.adapters import build_adapted, lora_layers, scalings, stacked_adapter

    stacked, R = stacked_adapter(factors, scalings(model), residual)
    wide = cfg.model_copy(update={"rank": R, "alpha": float(R), "dropout": 0.0})
    adapter, _ = build_adapted(wide)
    with torch.no_grad():
        for key, mod in lora_layers(adapter).items():
            Bp, Ap = stacked[key]
            mod.lora_A["default"].weight.copy_(Ap)
            mod.lora_B["default"].weight.copy_(Bp)
    return adapter
