"""One builder per cache: an exclusive lease with a heartbeat and the takeover of a stale one.

Two ``cache-build`` runs on one output would damage each other (both create the group, both
compute and commit the same units, both rewrite the manifest of a finished cache). So a build
first takes the lease ``_control/lease.json`` under the cache root, a small JSON record naming
its holder (host, pid, start time, a random token):

* **Taking it** is an exclusive create, which of two racing builders exactly one wins: locally
  ``O_CREAT | O_EXCL``; on S3 a conditional PUT (``If-None-Match: *``, s3fs's
  ``mode="create"``). The loser reads the record and is refused with the holder named
  (:class:`~unidistill.errors.CacheBusyError`), or with ``wait`` polls until the lease is free.
* **Heartbeat.** A daemon thread rewrites the record every ``heartbeat_s`` seconds (default 30,
  ``UNIDISTILL_LEASE_HEARTBEAT``), after checking it still holds this build's token. A record
  holding another token means the lease was taken over: :meth:`CacheLease.check`, called by the
  build between units, then raises :class:`~unidistill.errors.LeaseLostError`.
* **Stale lease.** A record not rewritten for ``STALE_AFTER_BEATS`` of its holder's heartbeats
  (by the store's modification time, so the holder's clock does not matter), or one whose
  holder's process no longer runs on this same host, is deleted (only if it still holds the
  token judged stale) and taken again by an exclusive create. A killed build's lease therefore
  does not block a rerun on its host, and blocks one elsewhere for 2 minutes by default.
* **Release** deletes the record if it still holds this build's token.

What it cannot do: two takers of one stale lease can both delete and create in the short window
between one's check and its delete; the loser of that race sees another token at its first
heartbeat check and stops before committing more than the unit in hand (and units are
deterministic: a unit written twice holds the same bytes, which ``finalize`` checks anyway).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from unidistill.distributed import seconds_from_env
from unidistill.errors import CacheBusyError, LeaseLostError
from unidistill.storage.files import utc_timestamp
from unidistill.storage.location import CacheLocation
from unidistill.storage.manifest import LEASE_KEY

HEARTBEAT_ENV = "UNIDISTILL_LEASE_HEARTBEAT"
DEFAULT_HEARTBEAT_S = 30.0
STALE_AFTER_BEATS = 4  # a lease not renewed for this many of its holder's heartbeats is stale


def heartbeat_from_env() -> float:
    return seconds_from_env(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S)


def describe_holder(record: dict) -> str:
    return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
            f"started {record.get('started_at', '?')}")


def _process_runs(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or no pid recorded: assume it runs
    return True


class CacheLease:
    """The lease of the cache at ``root`` (folder, URL or :class:`CacheLocation`)."""

    def __init__(self, root, *, heartbeat_s: float | None = None, log=print):
        self.location = CacheLocation(root)  # its own client: the heartbeat thread uses it
        self.heartbeat_s = heartbeat_from_env() if heartbeat_s is None else heartbeat_s
        self.log = log
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started_at": utc_timestamp(), "token": uuid.uuid4().hex,
                       "heartbeat_s": self.heartbeat_s}
        self._lost: str | None = None
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._new_folders: list[Path] = []  # local folders made for the lease, removed on release

    @property
    def stale_after(self) -> float:
        return self.heartbeat_s * STALE_AFTER_BEATS

    def _bytes(self) -> bytes:
        return json.dumps({**self.record, "heartbeat_at": utc_timestamp()}, sort_keys=True).encode()

    def read(self) -> dict | None:
        """The current record, ``{}`` for a file being written (created, not yet filled), or None
        when no lease is held."""
        raw = self.location.read_bytes(LEASE_KEY)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            return {}
        return record if isinstance(record, dict) else {}

    # -- taking it ---------------------------------------------------------------------------------
    def acquire(self, wait: bool = False, poll_s: float | None = None) -> "CacheLease":
        """Take the lease, or raise :class:`CacheBusyError` naming its holder; with ``wait``,
        poll every ``poll_s`` seconds (default: the heartbeat, at most 10 s) until it is free."""
        poll_s = min(self.heartbeat_s, 10.0) if poll_s is None else poll_s
        announced = False
        self._new_folders = self._missing_folders()
        while True:
            holder = self._attempt()
            if holder is None:
                break
            if not holder:  # released or broken just now: try again at once
                continue
            if not wait:
                raise self._busy(holder)
            if not announced:
                self.log(f"waiting for the lease of {self.location}: held by "
                         f"{describe_holder(holder)} ...")
                announced = True
            time.sleep(poll_s)
        self._last_beat = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="unidistill-lease", daemon=True)
        self._thread.start()
        return self

    def _attempt(self) -> dict | None:
        """One try: None when the lease is ours now; ``{}`` to try again at once; else the
        record of the live holder."""
        if self.location.create_exclusive(LEASE_KEY, self._bytes()):
            return None
        holder = self.read()
        if holder is None:
            return {}
        reason = self._stale_reason(holder)
        if reason is None:
            return holder or {"host": "?", "pid": "?", "started_at": "just now (being written)"}
        self.log(f"taking over the lease of {self.location} from {describe_holder(holder)}: {reason}")
        if self.read() == holder:  # still the one judged stale
            self.location.delete(LEASE_KEY)
        return {}

    def _stale_reason(self, holder: dict) -> str | None:
        age = self.location.modified_seconds_ago(LEASE_KEY)
        beat = holder.get("heartbeat_s")
        stale_after = STALE_AFTER_BEATS * (beat if isinstance(beat, (int, float)) else self.heartbeat_s)
        if age is not None and age > stale_after:
            return f"no heartbeat for {age:.0f} s (stale after {stale_after:g} s)"
        if holder.get("host") == self.record["host"] and "pid" in holder \
                and not _process_runs(holder["pid"]):
            return f"its process {holder['pid']} no longer runs on this host"
        return None

    def _busy(self, holder: dict) -> CacheBusyError:
        age = self.location.modified_seconds_ago(LEASE_KEY)
        beat = f", last heartbeat {age:.0f} s ago" if age is not None else ""
        return CacheBusyError(
            f"{self.location} is being built by another cache-build ({describe_holder(holder)}"
            f"{beat}); two builds on one --out would overwrite each other's work. Rerun with "
            "--wait to start when it ends (a finished cache is then reported complete), or "
            "choose another --out. A build that died leaves its lease to be taken over after "
            f"{self.stale_after:g} s without a heartbeat, or at once from its own host.")

    # -- holding it --------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self.read()
                if (holder or {}).get("token") != self.record["token"]:
                    self._lost = (f"the lease was taken over by {describe_holder(holder)}" if holder
                                  else "the lease file was deleted")
                    return
                self.location.write_bytes(LEASE_KEY, self._bytes())
                self._last_beat = time.monotonic()
            except Exception as e:  # a network error: try again at the next beat
                self.log(f"warning: could not renew the lease of {self.location}: {e}")

    def check(self) -> None:
        """Raise :class:`LeaseLostError` when the lease is no longer this build's."""
        silent = time.monotonic() - self._last_beat
        if self._lost is None and silent > self.stale_after:
            self._lost = f"it could not be renewed for {silent:.0f} s"
        if self._lost is not None:
            raise LeaseLostError(
                f"this build's lease on {self.location} is lost: {self._lost}. Another build may "
                "be writing there; this one stopped. Its committed units are kept: rerun the "
                "same command (with --wait) to resume once the other build has ended.")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this build's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if (self.read() or {}).get("token") == self.record["token"]:
            self.location.delete(LEASE_KEY)
        for folder in self._new_folders:  # a refused or failed build leaves no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        self._new_folders = []

    def _missing_folders(self) -> list[Path]:
        """The local folders the lease file's creation will make, deepest first."""
        if not self.location.is_local:
            return []
        folder, missing = Path(self.location.root, LEASE_KEY).parent.absolute(), []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        if not missing:
            missing.append(folder)  # _control/ itself, made by an earlier build
        return missing
