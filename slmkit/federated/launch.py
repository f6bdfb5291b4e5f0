"""``slm federate``: submit the Flower apps to a federation and show what came back.

Simulation (``--clients``): a Flower SuperLink and one SuperNode per client are started
as processes on 127.0.0.1 (free ports, a private ``FLWR_HOME``), each SuperNode with its
client's data in its node config; the run is submitted with Flower's own ``flwr run``;
everything is stopped afterwards. Deployment (``--superlink HOST:PORT``): the same run is
submitted to a SuperLink someone started, whose SuperNodes hold the data.

The ``ServerApp`` writes ``--out`` (on the SuperLink's machine: run ``slm federate`` there)
and a status file; this process reads it back as the step's result. Peak memory is the
largest sum of proportional set sizes (PSS) over every process of a simulation, sampled
twice a second.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from slmkit.console import human_bytes, log
from slmkit.errors import ConfigError, DataError, SlmError
from slmkit.federated.config import FederateConfig
from slmkit.step import StepResult, Table

__all__ = ["run_federate", "LocalFederation", "flower_bin"]

FLOWER_PIN = "flwr==1.42.0"


def flower_bin(name: str) -> str:
    """Path of a Flower console script installed beside this Python."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"slm federate needs Flower's '{name}'; install it with `pip install "
                          f"--no-deps {FLOWER_PIN}` and `pip install 'slmkit[federated]'`.")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SlmError(f"Flower's SuperLink exited at start (code {proc.returncode}); see "
                           f"{log_path}.")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SlmError(f"Flower's SuperLink did not listen on 127.0.0.1:{port} within "
                   f"{timeout:.0f} s; see {log_path}.")


def _flower_env(home: Path) -> dict[str, str]:
    """Flower's processes start each other by name: this Python's bin dir goes first.
    Telemetry and the update check (both network calls) are off: loopback only."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def _toml_str(value: str) -> str:
    return json.dumps(value)          # a JSON string is a valid TOML basic string


class LocalFederation:
    """A SuperLink and SuperNodes as processes on loopback; a context manager.

    Args:
        clients: ``[(name, data spec)]``, one SuperNode each.
        home: a private ``FLWR_HOME`` (apps, connection config, logs).
        threads: ``OMP_NUM_THREADS`` of every process.
    """

    def __init__(self, clients: list[tuple[str, str]], home: Path, threads: int,
                 preload: str | None = None):
        self.clients, self.home, self.threads, self.preload = clients, home, threads, preload
        self.procs: list[subprocess.Popen] = []
        self.port = _free_port()
        self.peak_memory = 0
        self._stop = threading.Event()

    def env(self) -> dict[str, str]:
        return {**_flower_env(self.home), "OMP_NUM_THREADS": str(self.threads),
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}

    def _spawn(self, args: list[str], name: str, env: dict[str, str] | None = None
               ) -> subprocess.Popen:
        logf = open(self.home / f"{name}.log", "w")
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT,
                                env={**self.env(), **(env or {})},
                                start_new_session=True, stdin=subprocess.DEVNULL)
        logf.close()
        self.procs.append(proc)
        return proc

    def start_superlink(self, env: dict[str, str] | None = None) -> str:
        link = self._spawn([flower_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                            "--port", str(self.port),
                            "--disable-runtime-dependency-installation"], "superlink", env)
        _wait_port(self.port, link, self.home / "superlink.log")
        return f"127.0.0.1:{self.port}"

    def start_warm(self) -> dict[str, str]:
        """The warm ``flwr-clientapp`` (slmkit.federated.warm) the SuperNodes fork tasks
        from; returns the environment that points them at it."""
        from slmkit.federated.warm import SOCKET_ENV, install_shim

        sock = str(self.home / "warm.sock")
        shim_dir = self.home / "shim-bin"
        install_shim(shim_dir)
        self._spawn([sys.executable, "-m", "slmkit.federated.warm", sock,
                     *([self.preload] if self.preload else [])], "warm-clientapp")
        return {SOCKET_ENV: sock,
                "PATH": str(shim_dir) + os.pathsep + self.env()["PATH"]}

    def start_supernode(self, name: str, data: str, address: str,
                        env: dict[str, str] | None = None) -> subprocess.Popen:
        """One SuperNode, the way a client machine starts it (``flower-supernode``)."""
        node_config = f"name={_toml_str(name)} data={_toml_str(data)}"
        return self._spawn([flower_bin("flower-supernode"), "--insecure", "--superlink",
                            address, "--host", "127.0.0.1", "--port", str(_free_port()),
                            "--node-config", node_config], f"supernode-{name}", env)

    def __enter__(self) -> "LocalFederation":
        warm = self.start_warm()
        address = self.start_superlink(warm)
        for name, data in self.clients:
            self.start_supernode(name, data, address, warm)
        threading.Thread(target=self._sample_memory, daemon=True).start()
        return self

    def _sample_memory(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in self.procs:
                try:
                    ps = psutil.Process(p.pid)
                    for q in [ps, *ps.children(recursive=True)]:
                        total += _pss(q)
                except psutil.Error:
                    continue
            self.peak_memory = max(self.peak_memory, total)
            self._stop.wait(0.5)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for p in reversed(self.procs):           # our own process groups, by id
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def _pss(proc) -> int:
    """Proportional set size (a forked child's copy-on-write pages shared with its parent
    count once overall, not once per process, as the sum of RSS would); RSS where the
    kernel does not say."""
    import psutil

    try:
        return proc.memory_full_info().pss
    except (AttributeError, psutil.AccessDenied):
        return proc.memory_info().rss


def write_app(folder: Path, cfg: FederateConfig, launch: str, address: str) -> None:
    """The Flower App dir ``flwr run`` packs: components are slmkit's installed apps, the
    run config is ``cfg``; plus the SuperLink connection in ``FLWR_HOME/config.toml``."""
    import tomli_w

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps({
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "slmkit-federate", "version": "1.0.0", "dependencies": [],
                    "description": "slm federate: LoRA fine-tuning on Flower",
                    "license": "Apache-2.0"},
        "tool": {"flwr": {"app": {
            "publisher": "slmkit",
            "components": {"serverapp": "slmkit.federated.apps:server_app",
                           "clientapp": "slmkit.federated.apps:client_app"},
            "config": {"config": cfg.model_dump_json(exclude_unset=True), "launch": launch}}}}}))


def _connection(home: Path, address: str) -> None:
    import tomli_w

    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": "slmkit", "slmkit": {"address": address, "insecure": True}}}))


def submit(app: Path, home: Path, log_path: Path) -> int:
    """``flwr run APP slmkit --stream``: returns its exit code; our round lines are shown."""
    env = _flower_env(home)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([flower_bin("flwr"), "run", str(app), "slmkit", "--stream"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, stdin=subprocess.DEVNULL)
        for line in proc.stdout:
            logf.write(line)
            if "[slmkit]" in line:
                log.info("%s", line.split("[slmkit]", 1)[1].strip())
        return proc.wait()


def _fits(cfg: FederateConfig):
    """Whether a built-in task row, rendered as training renders it, fits ``--seq-len``."""
    from slmkit.data.corpus import Document
    from slmkit.models import load_tokenizer
    from slmkit.train.sft import format_example

    tok = load_tokenizer(cfg.model)
    template = "plain" if cfg.template == "auto" else cfg.template

    def fits(row: dict) -> bool:
        doc = Document(row["id"], row["prompt"] + row["completion"], prompt=row["prompt"])
        return len(format_example(tok, doc, "-", template).ids) <= cfg.seq_len + 1
    return fits


def _precheck(cfg: FederateConfig, clients: list[tuple[str, str]]) -> None:
    """Refuse a client whose data is missing, unreadable or empty before starting anything."""
    from slmkit.federated.local import load_examples
    from slmkit.models import load_tokenizer

    tok = load_tokenizer(cfg.model)
    for name, data in clients:
        try:
            load_examples(cfg, data, tok)
        except DataError as e:
            raise DataError(f"client '{name}' ({data}): {e}") from None
    if cfg.eval_data:
        load_examples(cfg, cfg.eval_data, tok)


def run_federate(cfg: FederateConfig) -> StepResult:
    """``slm federate``: federated LoRA / QLoRA over Flower (simulation or deployment)."""
    flower_bin("flwr")
    from slmkit.federated.split import client_specs
    from slmkit.models.io import resolve_ref
    from slmkit.train.run import prepare_out

    t0 = time.perf_counter()
    cfg.output()                               # "federate needs an output directory"
    out, ck_root = prepare_out(cfg)
    resolve_ref(cfg.model)                     # a built-in is imported once, here
    updates: dict = {"out": str(out.resolve())}
    for field in ("model", "eval_data"):           # processes elsewhere see the same files
        value = getattr(cfg, field)
        if value and Path(value).expanduser().exists():
            updates[field] = str(Path(value).expanduser().resolve())
    clients: list[tuple[str, str]] = []
    if cfg.clients:
        clients = [(n, str(Path(d).expanduser().resolve()) if Path(d).expanduser().exists()
                     else d) for n, d in client_specs(cfg.clients, ck_root, cfg.max_samples,
                                                      _fits(cfg))]
        if cfg.template == "auto" and any(c.startswith("split:") for c in cfg.clients):
            updates["template"] = "plain"                     # raw-code prompts
        updates["threads"] = cfg.threads or max(1, (os.cpu_count() or 1) // len(clients))
    cfg = cfg.model_copy(update=updates)
    if clients:
        _precheck(cfg, clients)
    launch = uuid.uuid4().hex[:12]
    status = ck_root / f"status-{launch}.json"
    work = Path(tempfile.mkdtemp(prefix="slm-federate-"))
    fed = None
    try:
        app, home = work / "app", work / "home"
        home.mkdir()
        if clients:
            fed = LocalFederation(clients, home, cfg.threads or 1,
                                  preload=cfg.model)
            fed.__enter__()
            address = f"127.0.0.1:{fed.port}"
        else:
            address = cfg.superlink
        _connection(home, address)
        write_app(app, cfg, launch, address)
        code = submit(app, home, work / "flwr-run.log")
        if not status.exists():
            tail = (work / "flwr-run.log").read_text()[-1500:]
            raise SlmError(f"the Flower run ended (code {code}) without a result from the "
                           f"ServerApp; its log ends with: {tail.strip()[-600:]}")
    finally:
        if fed is not None:
            fed.__exit__(None, None, None)
        if not os.environ.get("SLMKIT_KEEP_FLOWER_LOGS"):
            shutil.rmtree(work, ignore_errors=True)
    result = json.loads(status.read_text())
    if not result["ok"]:
        if result.get("kind") == "bug":
            raise RuntimeError(f"the ServerApp failed: {result['error']}\n"
                               f"{result.get('traceback', '')}")
        raise SlmError(result["error"])
    return _result(cfg, result, clients, fed, time.perf_counter() - t0)


def _result(cfg: FederateConfig, r: dict, clients, fed, wall: float) -> StepResult:
    history = r.pop("history")
    figures = {**r, "wall_seconds": wall}
    if fed is not None:
        figures["peak_memory_bytes"] = fed.peak_memory
    rows_t = [(h["round"], len(h["clients"]), f"{h['train_loss']:.4f}",
               f"{h['eval_loss']:.4f}" if "eval_loss" in h else "-",
               human_bytes(h["upload_bytes_per_client"]), human_bytes(h["download_bytes_per_client"]),
               f"{h['seconds']:.1f}", ", ".join(f"{k} ({v})" for k, v in h["left_out"].items())
               or "-") for h in history]
    header = ("round", "clients", "train loss", "eval loss", "up / client", "down / client",
              "s", "left out")
    rows = [("mode", f"simulation ({len(clients)} SuperNodes on 127.0.0.1)" if clients
             else f"deployment (SuperLink {cfg.superlink})"),
            ("method", f"{cfg.method} r={cfg.rank} alpha={cfg.alpha:g}, {cfg.aggregation} "
                       "aggregation"),
            ("rounds", f"{r['rounds']} x {cfg.local_steps} local steps"),
            ("adapter", f"{human_bytes(r['adapter_bytes'])} (sent by each client each round: "
                        f"{human_bytes(r['upload_bytes_per_client_round'])} with framing)")]
    if "eval_loss" in r:
        rows.append(("eval loss", f"{r.get('eval_loss_start', float('nan')):.4f} -> "
                                  f"{r['eval_loss']:.4f}"))
    if "dp_epsilon" in r:
        rows.append(("privacy", f"epsilon {r['dp_epsilon']:.2f} at delta {r['dp_delta']:g} "
                                f"(noise x{r['dp_noise_multiplier']:.3f}, clip {r['dp_clip']:g})"))
    if fed is not None:
        rows.append(("peak memory", f"{human_bytes(fed.peak_memory)} (PSS, all processes)"))
    rows += [("time", f"{wall:.1f} s"), ("written to", f"{cfg.out} (merged model"
             + (", adapter/" if cfg.method == "lora" else "") + ")")]
    return StepResult("federate", cfg.out, figures, rows,
                      tables=[Table("rounds", rows_t, header)])
