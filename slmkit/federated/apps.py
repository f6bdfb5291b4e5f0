"""The Flower apps: one ``ClientApp`` and one ``ServerApp``, the same in both modes.

Flower (``flwr``) runs them: in simulation slmkit starts a SuperLink and one SuperNode per
client on loopback; in deployment they run wherever the user started them. The run config
carries the whole :class:`~slmkit.federated.config.FederateConfig` as JSON (key
``config``); each SuperNode's node config says where its data is (``data``) and, if it
wants, its name and its own copy of the model (``name``, ``model``).

A client trains the adapter it receives (plus the frozen residual of the exact
aggregation) in the one loop and replies with the adapter only. A client whose data is
missing, empty or malformed replies with a ``refused`` sentence instead; the server
leaves it out of the round and reports it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

__all__ = ["client_app", "server_app"]

client_app = ClientApp()
server_app = ServerApp()


def _config(context: Context):
    from slmkit.federated.config import FederateConfig

    return FederateConfig.model_validate_json(str(context.run_config["config"]))


def client_name(node_config) -> str:
    """The client's name: its node config's ``name``, else its data's file or dir name."""
    if node_config.get("name"):
        return str(node_config["name"])
    data = str(node_config.get("data", "?"))
    return Path(data.rstrip("/")).stem or data


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One round on this node's data: load, apply the global adapter, train, reply."""
    from slmkit.errors import SlmError
    from slmkit.federated.adapters import attach_residual, get_factors, set_factors
    from slmkit.federated.local import load_examples, train_round
    from slmkit.federated.server import unpack_residual

    import time

    t0 = time.perf_counter()
    cfg = _config(context)
    name = client_name(context.node_config)
    cfg.apply_threads()
    try:
        data = context.node_config.get("data")
        if not data:
            raise SlmError(f"SuperNode '{name}' has no data; start it with --node-config "
                           "'data=\"/path/to/task.jsonl\"'.")
        from slmkit.federated.adapters import build_adapted

        model, tok = build_adapted(cfg, context.node_config.get("model") or None)
        examples = load_examples(cfg, str(data), tok)
    except SlmError as e:
        return Message(RecordDict({"client": ConfigRecord({"name": name,
                                                           "refused": str(e)})}),
                       reply_to=msg)
    set_factors(model, msg.content["arrays"].to_torch_state_dict())
    if "residual" in msg.content:
        attach_residual(model, unpack_residual(msg.content["residual"].to_torch_state_dict()))
    round_no = int(msg.content["config"]["server-round"])
    stats = train_round(model, tok, examples, cfg, round_no)
    arrays = ArrayRecord(get_factors(model))
    metrics = MetricRecord({"num-examples": len(examples), "unit-weight": 1,
                            "train-loss": stats["train_loss"], "seconds": stats["seconds"],
                            "tokens": stats["tokens"], "upload-bytes": arrays.count_bytes(),
                            "handler-seconds": time.perf_counter() - t0,
                            "peak-rss-mb": _peak_rss_mb()})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics,
                               "client": ConfigRecord({"name": name})}), reply_to=msg)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds, write the model; the outcome goes to a status file for
    ``slm federate`` (it reads it after the Flower run ends)."""
    from slmkit.errors import SlmError
    from slmkit.federated.server import run_rounds

    cfg = _config(context)
    (Path(cfg.out) / "checkpoints").mkdir(parents=True, exist_ok=True)
    try:
        result = run_rounds(grid, cfg)
        payload = {"ok": True, **result}
    except SlmError as e:
        payload = {"ok": False, "error": str(e), "kind": type(e).__name__}
    except Exception as e:                       # a bug: keep its traceback for the user
        import traceback

        payload = {"ok": False, "error": f"{type(e).__name__}: {e}", "kind": "bug",
                   "traceback": traceback.format_exc()}
    # after a success checkpoints/ has moved into the new out: the same path
    status = Path(cfg.out) / "checkpoints" / f"status-{context.run_config['launch']}.json"
    status.parent.mkdir(parents=True, exist_ok=True)
    tmp = status.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, status)
