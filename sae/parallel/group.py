"""Joining the process group of a multi-process run, and its collectives.

Rendezvous: under `torchrun` its agent has already gathered the processes and hosts the store
(TORCHELASTIC_USE_AGENT_STORE), so `env://` is used as is. Otherwise (a SLURM job of several
tasks, or RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set by hand) rank 0 hosts a TCP store that
every rank must reach within `hardware.rendezvous_timeout_s`; a SLURM step gets its address and
port from submitit (the first host of the job, a port derived from the job id).

A collective that fails (a rank died: gloo sees the connection close) or waits longer than
`hardware.collective_timeout_s` (a rank hung) raises `LostRankError`: one line, no hang.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import random
import socket
from typing import Iterator

import torch
import torch.distributed as dist

from sae.errors import ReportedError, UserInputError
from sae.hardware import Device, HardwareConfig
from sae.world import LOCAL, Collective, World


class LostRankError(ReportedError):
    """A collective failed: another rank died, hung past the timeout, or the network broke."""


class ProcessGroupCollective(Collective):
    """The collectives of torch.distributed's default group."""

    def __init__(self, world: World):
        self.rank, self.size, self.world = world.rank, world.size, world

    def _run(self, what: str, call):
        with self.guarded(what, every_runtime_error=True):  # an error here can only be the collective's
            return call()

    @contextlib.contextmanager
    def guarded(self, what: str, every_runtime_error: bool = False) -> Iterator[None]:
        """Around other work (DDP's backward), only errors from the transport count as a lost rank."""
        try:
            yield
        except (RuntimeError, dist.DistError) as error:  # DistBackendError, DistNetworkError, timeouts
            if not (every_runtime_error or isinstance(error, dist.DistError) or _from_transport(error)):
                raise
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise LostRankError(f"rank {self.rank} of {self.size}: {what} failed ({first}); another rank died or hung "
                                "(its own log says why); the run stops here and resumes from its last checkpoint "
                                "when started again") from error

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self._run("all_reduce(sum)", lambda: dist.all_reduce(tensor, dist.ReduceOp.SUM))
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        self._run("all_reduce(max)", lambda: dist.all_reduce(tensor, dist.ReduceOp.MAX))
        return tensor

    def min(self, tensor: torch.Tensor) -> torch.Tensor:
        self._run("all_reduce(min)", lambda: dist.all_reduce(tensor, dist.ReduceOp.MIN))
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self._run("all_gather", lambda: dist.all_gather(parts, tensor))
        return torch.stack(parts)

    def broadcast_object(self, obj):
        holder = [obj]
        self._run("broadcast", lambda: dist.broadcast_object_list(holder, src=0))
        return holder[0]

    def barrier(self) -> None:
        self._run("barrier", dist.barrier)


def _from_transport(error: Exception) -> bool:
    """A RuntimeError raised by gloo or NCCL (e.g. gloo's "[.../gloo/transport/tcp/pair.cc] Read
    error" when the peer's socket closes)."""
    text = str(error).lower()
    return any(word in text for word in ("gloo", "nccl", "connection reset", "connection closed", "broken pipe"))


def free_port() -> int:
    """A free TCP port on this machine for a single-machine rendezvous (tests, benchmarks), taken
    below Linux's ephemeral range (32768-60999): a port the kernel hands out for binding to port 0
    can be handed out again as the source port of a rank connecting early, which then takes it from
    rank 0's listener ("address already in use")."""
    for _ in range(100):
        port = random.randrange(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free port found in 20000-32000")


def rendezvous_address(world: World) -> tuple[str, int]:
    """MASTER_ADDR/MASTER_PORT, filled in from SLURM through submitit when the launcher is SLURM."""
    if world.launcher == "slurm" and "MASTER_ADDR" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment()
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing:
        raise UserInputError(f"a {world.size}-process run needs {' and '.join(missing)} in the environment (where "
                             "rank 0 listens); launch with torchrun or a SLURM job, or set them")
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def _join(cfg: HardwareConfig, world: World) -> None:
    # Imported before the group exists, not first by a torch.optim optimizer inside it: importing
    # torch.distributed._shard (which torch._dynamo pulls in) while a gloo group is up kept that
    # group alive after destroy_process_group, with its worker threads. One of them could then
    # release a just-finished all_gather's tensors during interpreter exit and abort the process
    # (SIGABRT, "terminate called without an active exception"; docs/scale_out.md, "Clean exit").
    import torch._dynamo  # noqa: F401

    backend = cfg.dist_backend.value
    collective_timeout = datetime.timedelta(seconds=cfg.collective_timeout_s)
    if cfg.device is Device.cuda:
        torch.cuda.set_device(world.local_rank)  # "cuda" below means this rank's GPU
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(backend, init_method="env://", timeout=collective_timeout)
        return
    address, port = rendezvous_address(world)
    try:
        store = dist.TCPStore(address, port, world.size, is_master=world.is_main, wait_for_workers=True,
                              timeout=datetime.timedelta(seconds=cfg.rendezvous_timeout_s))
    except (RuntimeError, dist.DistError) as error:
        raise UserInputError(
            f"rank {world.rank} of {world.size}: the rendezvous at {address}:{port} failed within "
            f"hardware.rendezvous_timeout_s={cfg.rendezvous_timeout_s} ({str(error).strip().splitlines()[0][:160]}); "
            "check that every rank started and can reach MASTER_ADDR:MASTER_PORT") from None
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size, timeout=collective_timeout)


@contextlib.contextmanager
def joined(cfg: HardwareConfig, world: World) -> Iterator[Collective]:
    """The run's collective over all its processes for the body (LOCAL for one process)."""
    if world.size == 1:
        yield LOCAL
        return
    _join(cfg, world)
    try:
        yield ProcessGroupCollective(world)
    finally:
        dist.destroy_process_group()
        # Free the group and its finished work objects now, while the interpreter is whole: left in
        # reference cycles, they were freed by the exit's garbage collection, and a gloo thread
        # that released an all_gather's tensors then took the GIL during finalisation and aborted
        # the process ("terminate called without an active exception", SIGABRT: 16 of 60 two-rank
        # runs here, 0 of 70 with this collect).
        gc.collect()
