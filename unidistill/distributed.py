"""The few collective steps a multi-process ``cache-build`` needs: who am I, and did everyone succeed.

A build launched by ``torchrun --nproc_per_node N`` (or ``accelerate launch --multi_gpu
--num_processes N``, which starts the same ``torch.distributed.run`` workers) sees ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment (under
mpirun, the MPI rank and size variables stand in for the first three). The
processes then meet at a few sync points through a small gloo group (CPU tensors, so it works
the same beside a GPU teacher), never exchanging array data: every process writes its own work
units straight into the cache.

Every sync point is an :meth:`ProcessGroup.agree`: each process brings either its result or the
exception it caught, all of them learn every other's outcome, and if any failed every process
raises, so no process waits for a peer that has given up. A process that dies without reaching
the sync point (killed, out of memory) is noticed by the launcher (torchrun stops the other
workers when one exits with an error), by gloo (a closed connection fails the collective) or,
last of all, by the group's timeout (``UNIDISTILL_DIST_TIMEOUT`` seconds, default 3600). Between
sync points a build's processes also share a failure flag in the cache folder
(:mod:`unidistill.cache_builder.guard`), so a failure stops the others within one work unit.

Without a distributed environment (``WORLD_SIZE`` unset or 1) :meth:`ProcessGroup.from_env`
gives a single-process group whose sync points only re-raise the caller's own exception.
"""

from __future__ import annotations

import os
from datetime import timedelta

from unidistill.errors import ConfigError, UnidistillError

TIMEOUT_ENV = "UNIDISTILL_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0


class PeerFailedError(UnidistillError, RuntimeError):
    """Another process of a multi-process run failed; this one stops too."""


# torch.distributed.run sets the first of each; mpirun (accelerate launch --cpu with an MPI
# hostfile) the others. The same lists as accelerate's CPU launcher reads.
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                    "MV2_COMM_WORLD_LOCAL_RANK")


def _env_int(names, default: int, *, minimum: int = 0) -> int:
    """The first of ``names`` set in the environment, as an int >= ``minimum``; ``default`` when
    none is set. A value that is not such a whole number is refused, naming it: a launcher (or a
    stray export) that says something else must not silently become a single-process run."""
    for name in names:
        value = os.environ.get(name)
        if value is None:
            continue
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise ConfigError(
                f"environment variable {name}={value!r} is not a whole number >= {minimum}; "
                f"torchrun and accelerate launch set it to the process "
                f"{'count' if name in _SIZE_VARS else 'index'}. Unset it for a single-process "
                f"run, or launch with torchrun --nproc_per_node N")
        return number
    return default


def world_size_from_env() -> int:
    """The number of processes the launcher started (1 without a distributed launcher); a
    non-numeric or non-positive value is refused (:class:`~unidistill.errors.ConfigError`)."""
    return _env_int(_SIZE_VARS, 1, minimum=1)


def seconds_from_env(name: str, default: float) -> float:
    """A duration in seconds from the environment variable ``name`` (``default`` when unset); a
    value that is not a finite number > 0 is refused (:class:`~unidistill.errors.ConfigError`)."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"environment variable {name}={value!r} is not a number of seconds "
                          f"> 0; set it to e.g. {default:g}, or unset it for that default")
    return seconds


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class ProcessGroup:
    """Rank, size and the agree-or-raise sync point of one run's processes."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, *,
                 group=None, owns_default_group: bool = False):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self._group = group
        self._owns_default_group = owns_default_group

    @classmethod
    def from_env(cls) -> "ProcessGroup":
        """The group of a ``torchrun``-style launch, or a single-process group."""
        world = world_size_from_env()
        if world <= 1:
            return cls()
        import torch.distributed as dist

        timeout = timedelta(seconds=seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        owns = False
        group = None
        if not dist.is_initialized():
            missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
            if missing:
                raise UnidistillError(f"{world} processes launched, but {' and '.join(missing)} "
                                      "is not set; launch with torchrun or accelerate launch, or "
                                      "set MASTER_ADDR and MASTER_PORT")
            dist.init_process_group(backend="gloo", rank=_env_int(_RANK_VARS, 0), world_size=world,
                                    timeout=timeout)
            owns = True
        elif dist.get_backend() != "gloo":
            group = dist.new_group(backend="gloo", timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size(), _env_int(_LOCAL_RANK_VARS, 0),
                   group=group, owns_default_group=owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def agree(self, error: BaseException | None = None, payload=None) -> list:
        """Sync point: every process's ``payload`` (a list indexed by rank), or an exception.

        ``error`` is the exception this process caught since the last sync point (None when it
        succeeded); it is re-raised here, after the other processes have been told. When another
        process failed, :class:`PeerFailedError` names it and its error.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return [payload]
        import torch.distributed as dist

        mine = (None if error is None else _describe(error), payload)
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self._group)
        if error is not None:
            raise error
        failed = [(rank, msg) for rank, (msg, _) in enumerate(gathered) if msg is not None]
        if failed:
            rank, msg = failed[0]
            raise PeerFailedError(f"process {rank} of {self.world_size} failed ({msg}); "
                                  f"process {self.rank} stops too")
        return [p for _, p in gathered]

    def close(self) -> None:
        if self._owns_default_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_default_group = False
