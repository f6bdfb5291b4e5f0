"""Continuous evaluation: a small task set run against the live model in the background.

``slm serve MODEL --canary TASKS.jsonl --canary-every 10m`` scores the generation items of
TASKS.jsonl (the task format of :mod:`slmkit.eval.tasks`: greedy, the item's stop strings,
its metric) every interval, through the same engine the clients use, at low priority: an
item is submitted only while no client request waits for a slot, and one at a time.

The first run is the baseline. Each run sets the gauges ``slm_canary_score{task}``,
``slm_canary_baseline{task}``, ``slm_canary_alert{task}`` (1 while the score is more than
``--canary-drop`` below the baseline) and ``slm_canary_last_run_timestamp_seconds``, and
counts runs in ``slm_canary_runs``. An alert also writes one JSON log line
(``"event": "canary_alert"``) and, with ``--canary-webhook URL``, POSTs that JSON to URL.
Canary requests are marked ``canary = 1`` in the request log and stay out of the
``slm_recent_*`` confidence gauges.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.request
from pathlib import Path

from slmkit.engine import FinishEvent, SamplingParams
from slmkit.errors import ConfigError

log = logging.getLogger("slmkit.serve.access")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> float:
    """Seconds in ``"90"``, ``"30s"``, ``"10m"``, ``"1h"`` or ``"1d"``.

    Raises:
        ValueError: anything else, or under one second.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m:
        raise ValueError(f"'{text}' is not an interval; write e.g. 30s, 10m or 1h")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 1:
        raise ValueError(f"'{text}' is under one second; canaries need at least 1s")
    return seconds


def load_canary(path: str) -> list[dict]:
    """The generation items of a task file (a canary of another kind is refused)."""
    from slmkit.errors import DataError
    from slmkit.eval.tasks import GEN, read_task_file

    try:
        items = read_task_file(path)
    except DataError as e:
        raise ConfigError(f"--canary: {e}") from None
    if items[0]["type"] != GEN:
        raise ConfigError(f"--canary {path} holds {items[0]['type']} items; canaries run "
                          "generation items (prompt, answer, metric).")
    return items


class Canary:
    """The background evaluation loop of one server (see the module doc)."""

    def __init__(self, service, metrics, path: str, every: float, drop: float,
                 webhook: str | None = None):
        self.service, self.metrics = service, metrics
        self.items = load_canary(path)
        self.task = Path(path).stem
        self.every, self.drop, self.webhook = every, drop, webhook
        self.baseline: float | None = None
        self.runs = 0
        self.history: list[dict] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep serving; say so once per failed run
                log.warning(json.dumps({"event": "canary_error", "error": str(e)}))
            await asyncio.sleep(self.every)

    async def _answer(self, item: dict) -> str:
        engine = self.service.engine
        while engine.queue_depth > 0 or engine.engine.free_slots == 0:
            await asyncio.sleep(0.2)  # clients first
        ids = self.service.tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
        n = item["max_new_tokens"]
        ids = ids[-max(1, self.service.max_seq_len - n - 1):]
        params = SamplingParams(max_tokens=n, temperature=0, stop=item["stop"],
                                confidence=self.service.config.monitor)
        generation = engine.submit(ids, params, request_id=f"canary-{self.runs}")
        generation.context = {"request_id": generation.handle.id}
        generation.monitor = {"endpoint": "canary", "canary": True, "prompt": item["prompt"]}
        while True:
            event = await generation.next_event()
            if isinstance(event, FinishEvent):
                return event.completion.text

    async def run_once(self) -> dict:
        """Score every item once; update the gauges; alert on a drop."""
        from slmkit.eval.ops import exact_match, rouge_l, token_f1

        scorers = {"exact_match": exact_match, "f1": token_f1, "rouge_l": rouge_l}
        t0 = time.time()
        total = 0.0
        for item in self.items:
            text = await self._answer(item)
            total += scorers[item["metric"]](text, item["answer"])
        score = total / len(self.items)
        self.runs += 1
        if self.baseline is None:
            self.baseline = score
        alert = score < self.baseline - self.drop
        record = {"event": "canary_alert" if alert else "canary", "task": self.task,
                  "score": round(score, 4), "baseline": round(self.baseline, 4),
                  "drop_threshold": self.drop, "items": len(self.items),
                  "seconds": round(time.time() - t0, 2), "ts": round(time.time(), 3)}
        self.history.append(record)
        m = self.metrics
        m.set_gauge("canary_score", score, "Canary task score of the last run.", task=self.task)
        m.set_gauge("canary_baseline", self.baseline, "Canary task score of the first run.",
                    task=self.task)
        m.set_gauge("canary_alert", float(alert), "1 while the canary score is below "
                    "baseline - drop.", task=self.task)
        m.set_gauge("canary_last_run_timestamp_seconds", time.time(), "When the last canary "
                    "run ended (Unix time).", task=self.task)
        m.set_gauge("canary_runs", self.runs, "Canary runs since start.", task=self.task)
        (log.warning if alert else log.info)(json.dumps(record))
        if alert and self.webhook:
            await asyncio.to_thread(self._post, record)
        return record

    def _post(self, record: dict) -> None:
        req = urllib.request.Request(self.webhook, data=json.dumps(record).encode(),
                                     headers={"Content-Type": "application/json"},
                                     method="POST")
        try:
            urllib.request.urlopen(req, timeout=10).close()
        except OSError as e:
            log.warning(json.dumps({"event": "canary_webhook_failed", "url": self.webhook,
                                    "error": str(e)}))
