"""Data parallelism for the one training loop, on ``torch.distributed`` (launched by torchrun).

``torchrun --nproc-per-node N [--nnodes M ...] -m slmkit.cli train ...`` starts N x M copies
of the same command; each reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``
from the environment torchrun sets, joins one process group (gloo: slmkit trains on CPU;
:meth:`Dist.init` picks NCCL when given a CUDA device) and trains one shard of every batch. Without those variables
:meth:`Dist.from_env` is the single process (world size 1) and every method is a no-op, so
the loop has one code path.

What makes N processes train exactly what one process trains with the same command:

* **The global batch is the command's batch.** Micro-batch ``i`` is still
  ``batches.batch(i)`` (``--batch-size`` rows, a pure function of seed and index); rank ``r``
  keeps rows ``[r * B / N, (r + 1) * B / N)`` (:meth:`Dist.shard`). The step count, the
  tokens per step and so the learning-rate schedule do not depend on N, and a checkpoint
  written at one world size resumes at any other.
* **The loss is the global token mean.** Each rank scales its micro-batch loss by its share
  of the micro-batch's labelled tokens times N before DistributedDataParallel averages the
  gradients over the N ranks, so uneven shards (SFT rows of different lengths) weigh what
  they weigh in one process (:meth:`Dist.loss_scale`).
* **Only rank 0 writes** checkpoints, logs and the output dir; every rank reads checkpoints
  on ``--resume`` (so on several machines ``--out`` must be on a filesystem all of them
  share; a rank that cannot see the checkpoint stops the job with a message saying so).

When a rank dies, the others fail instead of hanging: a collective whose peer is gone raises
at once (gloo sees the closed connection), one that waits on a stuck peer raises after
``--dist-timeout`` seconds, and torchrun's SIGTERM to the survivors becomes an error naming
the cause (:func:`lost_rank_error`).

Reference: Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training" (DistributedDataParallel).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch

from slmkit.errors import ConfigError, SlmError


class DistributedError(SlmError):
    """A rank of a torchrun job failed or lost its peers; the job stops (exit code 2)."""


_ENV = ("RANK", "WORLD_SIZE")


def launched() -> bool:
    """True under torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return all(k in os.environ for k in _ENV)


@dataclass
class Dist:
    """This process' place in the job: ``rank`` of ``world_size`` (1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "Dist":
        if not launched():
            return cls()
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local = int(os.environ.get("LOCAL_RANK", rank))
        except ValueError:
            raise ConfigError("RANK/WORLD_SIZE/LOCAL_RANK are not integers; start the job "
                              "with torchrun.") from None
        return cls(rank, world, local)

    # ------------------------------------------------------------------ process group

    def init(self, timeout_s: float, device: torch.device | None = None) -> None:
        """Join the process group (gloo on CPU, NCCL for a CUDA model); a no-op alone."""
        if not self.active:
            return
        import torch.distributed as dist

        cuda = device is not None and device.type == "cuda"
        self.backend = "nccl" if cuda else "gloo"
        if not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ:
                raise ConfigError("WORLD_SIZE is set but MASTER_ADDR is not; start the job "
                                  "with torchrun.")
            try:
                dist.init_process_group(self.backend, rank=self.rank,
                                        world_size=self.world_size,
                                        timeout=datetime.timedelta(seconds=timeout_s))
            except RuntimeError as e:
                raise DistributedError(f"rank {self.rank} of {self.world_size} could not join "
                                       f"the job at {os.environ.get('MASTER_ADDR')}:"
                                       f"{os.environ.get('MASTER_PORT')} ({_first_line(e)}); "
                                       "check --master-addr/--master-port and that every "
                                       "node can reach it.") from None

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            with self.guard():
                dist.barrier()

    @contextlib.contextmanager
    def guard(self):
        """Turn a collective that failed because a peer died or timed out into one clear
        :class:`DistributedError` (the torch error is kept as its cause)."""
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as e:
            if not self.active:
                raise
            raise lost_rank_error(self, _first_line(e)) from e

    @contextlib.contextmanager
    def rank_zero_first(self):
        """Rank 0 runs the block before the others (it may create shared caches in it)."""
        if self.active and not self.is_main:
            self.barrier()
        yield
        if self.active and self.is_main:
            self.barrier()

    @contextlib.contextmanager
    def stop_on_sigterm(self):
        """Make torchrun's SIGTERM (sent to the survivors when one rank fails) an error that
        says so, instead of a silent death; restored afterwards."""
        if not self.active:
            yield
            return

        def handler(signum, frame):
            raise lost_rank_error(self, "stopped by torchrun (SIGTERM)")

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        except DistributedError:
            # this rank is already leaving with the error: a SIGTERM that torchrun sends
            # meanwhile must not kill it before the error is printed (it did, now and then,
            # when the peer's broken connection was noticed first)
            previous = signal.SIG_IGN
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)

    # ------------------------------------------------------------------ data

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of a global micro-batch (every tensor's dim 0 split in N
        contiguous, near-equal parts; the first ``B % N`` ranks get one row more)."""
        if not self.active:
            return batch
        rows = next(iter(batch.values())).shape[0]
        lo, hi = shard_bounds(rows, self.rank, self.world_size)
        return {k: v[lo:hi] for k, v in batch.items()}

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the ranks (float64 on CPU; a copy)."""
        if not self.active:
            return values
        import torch.distributed as dist

        out = values.detach().to(torch.float64 if self.backend == "gloo" else values.dtype)
        out = out.clone()
        with self.guard():
            dist.all_reduce(out)
        return out

    def broadcast_float(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        with self.guard():
            dist.broadcast(t, src=0)
        return float(t[0])

    def loss_scale(self, n_local: int, n_global: float) -> float:
        """What multiplies this rank's mean micro-batch loss so that DDP's gradient average
        equals the gradient of the global token mean: ``N * n_local / n_global``
        (exactly 1.0 in one process)."""
        if not self.active:
            return 1.0
        if n_global <= 0:                     # nothing labelled anywhere: no signal
            return 0.0
        return self.world_size * n_local / n_global

    # ------------------------------------------------------------------ model

    def wrap(self, model: torch.nn.Module, strategy: str = "ddp") -> torch.nn.Module:
        """The model the objective calls: DistributedDataParallel around a :class:`Replica`
        (the model itself alone). Parameters and buffers come from rank 0 once; buffers are
        not re-broadcast every forward (every rank builds the same model).

        ``strategy="fsdp"`` shards the model in place instead (:meth:`shard_model`) and
        returns it.
        """
        if not self.active:
            return model
        if strategy == "fsdp":
            return self.shard_model(model)
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        cfg = getattr(model, "config", None)
        sparse = bool(getattr(cfg, "num_local_experts", 0) or getattr(cfg, "num_experts", 0))
        with self.guard():       # a mixture of experts leaves unrouted experts without grads
            return DDP(Replica(model), device_ids=ids, forward_sync_buffers=False,
                       find_unused_parameters=sparse)


    def shard_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP (``torch.distributed.fsdp.fully_shard``, FSDP2): each repeated block (the
        decoder layers) and then the rest of the model become one sharded unit, so a rank
        holds 1/N of the parameters, gradients and AdamW state, and gathers a block's
        parameters only while it runs (Zhao et al. 2023, "PyTorch FSDP"). Rank 0's initial
        weights are every rank's (each rank built the same model from the same seed).
        Returns the same module, now sharded."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = next(model.parameters()).device
        with self.guard():
            for p in model.parameters():        # every rank starts from rank 0's weights
                torch.distributed.broadcast(p.data, src=0)
            mesh = init_device_mesh(device.type, (self.world_size,))
            for block in repeated_blocks(model):
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The children of the model's longest ``nn.ModuleList`` (its decoder layers)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def gather_full_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """The full (unsharded) model and optimizer state of a sharded model, on rank 0's CPU
    (empty dicts elsewhere). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer,
                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: torch.nn.Module, optimizer, model_sd: dict,
                    optim_sd: dict) -> None:
    """Load full state dicts (every rank has them) into a sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_names(model: torch.nn.Module, optimizer) -> list[str]:
    """The parameter name of each position in the optimizer's groups (what the integer keys
    of ``optimizer.state_dict()`` count)."""
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state_by_name(sd: dict, names: list[str]) -> dict:
    """``optimizer.state_dict()`` (integer keys) -> the same keyed by parameter name."""
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                             for g in sd["param_groups"]]}


def optimizer_state_by_index(sd: dict, names: list[str]) -> dict:
    """The inverse of :func:`optimizer_state_by_name`: what ``load_state_dict`` reads, so
    a sharded run's checkpoint is the same file a one-process run writes."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in sd["param_groups"]]}


class Replica(torch.nn.Module):
    """What DistributedDataParallel wraps: the model, plus one extra entry point.

    ``replica(**kw)`` is ``model(**kw)``; ``replica(hidden_only=True, **kw)`` returns the
    final hidden states of the HF base model (``model.base_model(**kw)[0]``, ``[B, T, H]``),
    for objectives that project to the vocabulary in chunks themselves. Both go through
    DDP's forward, which is what lets it all-reduce the gradients of that backward.
    """

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_only: bool = False, **kwargs):
        if hidden_only:
            return getattr(self.inner, "base_model", self.inner)(**kwargs)[0]
        return self.inner(**kwargs)


def replicated(model: torch.nn.Module) -> bool:
    """True for the DDP-wrapped model of :meth:`Dist.wrap` (possibly ``torch.compile``d)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = getattr(model, "_orig_mod", model)
    return isinstance(model, DDP) and isinstance(model.module, Replica)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model behind ``torch.compile``, DDP and :class:`Replica` wrappers."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, DDP):
            model = model.module
        elif isinstance(model, Replica):
            model = model.inner
        else:
            return model


def shard_bounds(rows: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)`` rows of ``rank`` when ``rows`` are split in ``world`` contiguous parts."""
    base, extra = divmod(rows, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def check_world(batch_size: int, world: int) -> None:
    """Every rank needs at least one row of each micro-batch."""
    if world > batch_size:
        raise ConfigError(f"--batch-size {batch_size} is smaller than the {world} processes "
                          f"of this job, so some would get no rows; use --batch-size {world} "
                          "or more (it is the global batch, split over the processes).")


def lost_rank_error(d: Dist, cause: str) -> DistributedError:
    return DistributedError(
        f"rank {d.rank} of {d.world_size} stopped: another process of this torchrun job "
        f"failed or stopped answering ({cause}); the first failing rank's own error and "
        "torchrun's summary say which, and --resume continues from the last checkpoint.")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def describe(d: Dist) -> dict[str, Any]:
    """What the lineage records about the job's layout (the backend only with several)."""
    return {"world_size": d.world_size, **({"backend": d.backend} if d.active else {})}
