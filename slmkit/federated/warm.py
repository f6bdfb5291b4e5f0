"""Warm Flower app processes: torch, transformers and the base model loaded once per machine.

A Flower SuperNode runs every task in a fresh ``flwr-clientapp`` process, which imports
torch, transformers and peft and loads the model again: about 9 s of CPU per client per
round on a busy 2-core machine, more than a small model's whole round. This module keeps
one warm process per machine that has done that work once and forks a child per task; the
child runs Flower's own ``flwr-clientapp`` (or, for the SuperLink, ``flwr-serverapp``)
entry point unchanged.

Flower starts those commands by name from ``PATH``; :func:`install_shim` writes tiny
scripts of those names (standard library only) into a folder that goes first on the
SuperNode's (SuperLink's) ``PATH``. A script hands its arguments to the warm process over a
Unix socket and exits; when no warm process answers it becomes the real command
(``execv``), so a node without one still works, only slower.

Fork safety: the warm process keeps torch at one thread and never computes in parallel
before forking, so no OpenMP pool is inherited; each child sets its own threads.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

__all__ = ["install_shim", "serve", "SOCKET_ENV"]

#: Environment variable naming the warm process' socket.
SOCKET_ENV = "SLMKIT_WARM_CLIENTAPP"

_SHIM = """#!{python}
# slmkit's warm flwr-clientapp shim (slmkit/federated/warm.py): fork from a warm process.
import json, os, socket, sys
path = os.environ.get("{env}")
if path:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(json.dumps({{"cmd": {name!r}, "argv": sys.argv[1:], "cwd": os.getcwd(),
                              "env": dict(os.environ)}}).encode() + b"\\n")
        if s.makefile().readline().startswith("ok"):
            sys.exit(0)
    except OSError:
        pass
os.execv({real!r}, [{real!r}, *sys.argv[1:]])
"""


#: The Flower commands a warm process can stand in for, and their entry points.
_ENTRY = {"flwr-clientapp": ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp"),
          "flwr-serverapp": ("flwr.superlink.cli.flwr_serverapp", "flwr_serverapp")}


def install_shim(folder: Path) -> Path:
    """Write the ``flwr-clientapp`` and ``flwr-serverapp`` shims into ``folder`` (put it
    first on ``PATH``); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in _ENTRY:
        real = Path(sys.executable).parent / name
        shim = folder / name
        shim.write_text(_SHIM.format(python=sys.executable, env=SOCKET_ENV, real=str(real),
                                     name=name))
        shim.chmod(0o755)
    return folder


def _child(request: dict) -> None:
    """In the forked child: become ``CMD ARGS`` in the caller's cwd and env."""
    import importlib

    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = [request["cmd"], *request["argv"]]
    code = 0
    try:
        module, func = _ENTRY[request["cmd"]]
        getattr(importlib.import_module(module), func)()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:                       # a crash is the ClientApp's failure
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(socket_path: str, preload: str | None = None) -> None:
    """Import the client's libraries (and ``preload`` a model), then fork per request.

    Runs until SIGTERM. ``preload`` is a model reference: each child finds it already
    loaded (copy-on-write) through :func:`slmkit.federated.adapters.preloaded`.
    """
    import torch

    torch.set_num_threads(1)
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from flwr.superlink.cli import flwr_serverapp  # noqa: F401
    from flwr.supernode.cli import flwr_clientapp  # noqa: F401

    import slmkit.federated.apps  # noqa: F401
    import slmkit.train.loop  # noqa: F401
    from slmkit.federated import adapters

    if preload:
        adapters.preload(preload)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    Path(socket_path).unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX)
    server.bind(socket_path)
    server.listen(16)
    print(f"[slmkit] warm clientapp ready on {socket_path}", flush=True)
    while True:
        server.settimeout(1.0)
        try:
            conn, _ = server.accept()
        except socket.timeout:
            _reap()
            continue
        with conn:
            conn.settimeout(10)
            try:
                request = json.loads(conn.makefile().readline())
            except (OSError, ValueError):
                continue
            if request.get("cmd") not in _ENTRY:
                continue
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                _child(request)
            conn.sendall(b"ok\n")
        _reap()


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def main(argv: list[str]) -> None:
    """``python -m slmkit.federated.warm SOCKET [MODEL]``: write the shims beside the socket
    (``SOCKET.bin/``), print the two variables a SuperNode started after it needs, serve."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m slmkit.federated.warm SOCKET [MODEL]\n"
              "Serve warm Flower app processes; start flower-supernode with the printed "
              "environment.")
        return
    sock = str(Path(argv[0]).expanduser().resolve())
    shims = install_shim(Path(sock + ".bin"))
    print(f"export {SOCKET_ENV}={sock} PATH={shims}:$PATH", flush=True)
    serve(sock, argv[1] if len(argv) > 1 else None)


if __name__ == "__main__":
    main(sys.argv[1:])
