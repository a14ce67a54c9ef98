"""What keeps a build out of other builds' way, and a build's processes out of trouble together.

* **The lease** (:mod:`unidistill.storage.lease`): process 0 takes the output's lease before it
  loads anything, refused (naming the holder) or waiting under ``--wait``, and holds it, with
  its heartbeat, until the build has finished or failed. The other processes of the build take
  none: they write only the units process 0 hands them, into the cache it opened under the lease.
* **The failure flag** ``_control/failed.json``: in a multi-process build, a process that fails
  writes it (its rank and error) through the storage location, and every process reads it
  before each unit, so the others stop within one unit instead of finishing their whole share
  before the next sync point (which could outlast the collective timeout and lose the message
  naming the failed process). Process 0 deletes a leftover flag when it opens the cache.
* **Nothing blocks a rerun** of a build that failed before any unit was committed: process 0
  removes the cache it holds no work in, so a rerun with other settings needs no ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import json

from unidistill.distributed import PeerFailedError, ProcessGroup
from unidistill.errors import HiddenRangeError, LeaseLostError
from unidistill.storage.lease import CacheLease
from unidistill.storage.location import CacheLocation
from unidistill.storage.manifest import FAILURE_KEY, LEASE_KEY
from unidistill.storage.writer import CacheWriter, check_output


class BuildGuard:
    """One process's view of the lease (process 0 holds it) and of the failure flag."""

    def __init__(self, out, group: ProcessGroup, lease: CacheLease | None = None):
        self.location = CacheLocation(out)
        self.group = group
        self.lease = lease

    @classmethod
    def take(cls, out, group: ProcessGroup, *, wait: bool, log) -> "BuildGuard":
        """Process 0 takes the lease of ``out`` (a folder of other files is refused first, before
        anything is put there); the other processes hold none."""
        lease = None
        if group.is_main:
            check_output(CacheLocation(out))
            lease = CacheLease(out, log=log).acquire(wait=wait)
        return cls(out, group, lease)

    def clear_failure(self) -> None:
        """Process 0, under the lease, before the units are shared: an old flag is no news."""
        if self.group.distributed:
            self.location.delete(FAILURE_KEY)

    def check(self) -> None:
        """Between units: raise if the lease was lost or another process of the build failed."""
        if self.lease is not None:
            self.lease.check()
        if not self.group.distributed:
            return
        raw = self.location.read_bytes(FAILURE_KEY)
        if raw is not None:
            flag = json.loads(raw)
            raise PeerFailedError(f"process {flag['rank']} of {self.group.world_size} failed "
                                  f"({flag['error']}); process {self.group.rank} stops too")

    def flag_failure(self, error: BaseException) -> None:
        """Tell the other processes now (not at the next sync point) that this one failed."""
        if not self.group.distributed or isinstance(error, PeerFailedError):
            return
        with contextlib.suppress(Exception):  # the sync point still tells them
            self.location.write_json(FAILURE_KEY, {"rank": self.group.rank,
                                                   "error": f"{type(error).__name__}: {error}"})

    def holds_lease(self) -> bool:
        """True for process 0 while the lease is still this build's (never for the others)."""
        if self.lease is None:
            return False
        try:
            self.lease.check()
        except LeaseLostError:
            return False
        return True

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def discard_if_nothing_committed(writer: CacheWriter | None, log) -> None:
    """Process 0 after a failed build: a cache holding no committed unit is removed (its lease
    aside), so that nothing blocks a rerun with changed settings; committed work is never lost."""
    if writer is None or writer.already_complete or writer.committed_units():
        return
    writer.location.remove(keep=LEASE_KEY)
    log(f"removed {writer.root}: the build stopped before committing any unit")


def with_rerun_command(error: BaseException, cfg, writer: CacheWriter | None) -> BaseException:
    """A hidden-range error with the full command that stores the states (bfloat16), and
    ``--overwrite`` where units committed in float16 would otherwise refuse it."""
    if not isinstance(error, HiddenRangeError):
        return error
    committed = bool(writer is not None and writer.committed_units())
    command = cfg.command_line(hidden_dtype="bfloat16", overwrite=cfg.overwrite or committed)
    why = (" (--overwrite: units were committed with the other hidden dtype; they are replaced)"
           if committed else " (nothing was committed; the failed build left nothing behind)")
    return HiddenRangeError(f"{error}. Rerun as{why}:\n  {command}")
