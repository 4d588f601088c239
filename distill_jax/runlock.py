"""One writer per run directory: ``train-teacher``, ``soft-targets`` and ``train-student``
lock the directory they write before they touch it, and a second run on the same
directory stops with exit status 2 naming the run that holds it.

* **Local disk**: an exclusive ``fcntl.flock`` on ``DIR/.lock``, which records the holder
  (pid, host, command, start time). The kernel drops the lock when its process ends, however
  it ends (``kill -9`` included), so a killed run's lock is recovered at once; the file
  itself stays (deleting a lock file while another process waits on it would let two
  holders in). ``flock`` is reliable on local file systems; on NFS it depends on the server
  (Linux emulates it with POSIX locks), so keep work directories on local disk or ``gs://``.
* **Cloud Storage** (``gs://``): a *lease* object ``DIR/.lock`` with the same record,
  created with the precondition ``ifGenerationMatch=0`` (only one creator succeeds) and
  renewed by its holder every ``ttl/4`` seconds with ``ifGenerationMatch=<its generation>``.
  A lease not renewed for ``ttl`` seconds (default ``DEFAULT_LEASE_TTL_S``, env
  ``DISTILL_JAX_LEASE_TTL_S``; its age is measured on Cloud Storage's clock: the object's
  ``updated`` time against the ``Date`` of the answer) belongs to a dead run and is taken
  over, again under a generation precondition, so of two runs taking it over one wins; so
  is at once the lease of a holder on this host whose process has ended. A
  holder that finds its lease taken (it stalled for longer than ``ttl``) stops at its next
  checkpoint (:func:`check_held`) instead of writing beside the new holder.

In a multi-process run (several processes of one JAX job share one run directory) only
process 0 takes the lock, and every process learns whether it got it, so all of them stop
together when it did not. Locks are released by :func:`release_all`, which the CLI calls
when a command ends.
"""

from __future__ import annotations

import datetime
import email.utils
import fcntl
import json
import logging
import os
import socket
import sys
import threading
from urllib.parse import quote

from distill_jax import storage
from distill_jax.errors import UserError

logger = logging.getLogger("distill_jax")

LOCK_NAME = ".lock"
DEFAULT_LEASE_TTL_S = 120.0
_HTTP_TIMEOUT_S = 30.0
_HELD: list[RunLock] = []


def lease_ttl_s() -> float:
    """Seconds after which a ``gs://`` lease that was not renewed counts as abandoned."""
    value = os.environ.get("DISTILL_JAX_LEASE_TTL_S")
    try:
        ttl = float(value) if value else DEFAULT_LEASE_TTL_S
    except ValueError:
        raise UserError(
            f"DISTILL_JAX_LEASE_TTL_S must be a number of seconds, got {value!r}"
        ) from None
    if not ttl > 0:
        raise UserError(f"DISTILL_JAX_LEASE_TTL_S must be > 0, got {value!r}")
    return ttl


def _record(command: str, **extra) -> dict:
    """Who holds a lock: pid, host, command, start time (UTC)."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "argv": " ".join(sys.argv),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def describe(record: dict | None) -> str:
    """A holder record in words."""
    if not record:
        return "a run that is starting (its lock record is not written yet)"
    return (
        f"`{record.get('command', '?')}` (pid {record.get('pid', '?')} on host "
        f"{record.get('host', '?')}, started {record.get('started', '?')})"
    )


class RunLock:
    """A held lock on a run directory (see the module docstring)."""

    def __init__(self, directory: storage.PathLike, what: str):
        self.directory, self.what = storage.path(directory), what

    def release(self) -> None:
        raise NotImplementedError

    def lost(self) -> str | None:
        """Why the lock is no longer held, or None while it is."""
        return None


class FileLock(RunLock):
    """``flock`` on a local lock file."""

    def __init__(self, directory: storage.PathLike, what: str, name: str = LOCK_NAME):
        super().__init__(directory, what)
        storage.makedirs(self.directory)
        self.path = os.path.join(os.fspath(self.directory), name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(os.pread(fd, 1 << 16, 0))
            os.close(fd)
            raise UserError(
                f"{self.directory} is in use by {describe(holder)}; one run writes a run "
                f"directory at a time: wait for it to end, or stop it (its lock is "
                f"{self.path}; a lock of a process that has ended is released by the system)"
            ) from None
        data = json.dumps(_record(what)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # no record of a holder that has gone
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_record(data: bytes) -> dict | None:
    try:
        record = json.loads(data.decode() or "null")
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _ended_here(record: dict) -> bool:
    """Whether the lease's holder ran on this host and its process has ended (a rerun after
    ``kill -9`` on the same machine need not wait for the lease to expire). A reused pid
    only makes the holder look alive: the lease then waits for its expiry."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # (EPERM: another user's live process)
        return False
    return False


class _PreconditionFailed(Exception):
    """Cloud Storage answered 412: the object's generation is not the one given."""


class Lease(RunLock):
    """A lease object on Cloud Storage, renewed in a background thread."""

    def __init__(
        self,
        directory: storage.PathLike,
        what: str,
        name: str = LOCK_NAME,
        ttl_s: float | None = None,
    ):
        super().__init__(directory, what)
        self.ttl_s = lease_ttl_s() if ttl_s is None else ttl_s
        self.url = os.fspath(self.directory).rstrip("/") + "/" + name
        self.bucket = storage.bucket_of(self.url)
        self.key = self.url.partition("://")[2].split("/", 1)[1]
        self.endpoint, self.session = storage.json_api_session(self.url)
        self.record = _record(what, ttl_s=self.ttl_s)
        self.generation = self._take()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew_loop, name="distill-jax-lease", daemon=True
        )
        self._thread.start()

    # -- Cloud Storage JSON API calls
    def _request(self, method: str, url: str, **kwargs):
        import requests

        try:
            return self.session.request(method, url, timeout=_HTTP_TIMEOUT_S, **kwargs)
        except requests.RequestException as err:
            raise UserError(
                f"{self.url}: cannot reach Cloud Storage ({type(err).__name__}: {err})"
            ) from None

    def _check(self, response, doing: str):
        if response.status_code == 412:
            raise _PreconditionFailed()
        if not response.ok:
            raise UserError(
                f"{self.url}: Cloud Storage answered HTTP {response.status_code} "
                f"when {doing} the run's lease: {response.text[:200]}"
            )
        return response

    def _write(self, if_generation: str) -> str:
        """Writes the lease record if the object's generation is ``if_generation`` ("0":
        absent); returns the new generation."""
        response = self._request(
            "POST",
            f"{self.endpoint}/upload/storage/v1/b/{self.bucket}/o",
            params={"uploadType": "media", "name": self.key, "ifGenerationMatch": if_generation},
            data=json.dumps(self.record).encode(),
            headers={"Content-Type": "application/octet-stream"},
        )
        return str(self._check(response, "writing").json()["generation"])

    def _object_url(self) -> str:
        return f"{self.endpoint}/storage/v1/b/{self.bucket}/o/{quote(self.key, safe='')}"

    def _current(self) -> tuple[str, dict, float] | None:
        """(generation, record, seconds since it was last written, on Cloud Storage's
        clock) of the lease object, or None when there is none."""
        response = self._request("GET", self._object_url())
        if response.status_code == 404:
            return None
        meta = self._check(response, "reading").json()
        media = self._request(
            "GET", self._object_url(), params={"alt": "media", "generation": meta["generation"]}
        )
        record = _read_record(media.content) if media.ok else None
        updated = datetime.datetime.fromisoformat(meta["updated"].replace("Z", "+00:00"))
        date = response.headers.get("Date")
        now = (
            email.utils.parsedate_to_datetime(date)
            if date
            else datetime.datetime.now(datetime.timezone.utc)
        )
        # (Date has whole seconds: an age just under 0 is a fresh write)
        return str(meta["generation"]), record or {}, max(0.0, (now - updated).total_seconds())

    def _take(self) -> str:
        for _ in range(5):
            try:
                return self._write("0")
            except _PreconditionFailed:
                pass
            current = self._current()
            if current is None:  # released in between: try again
                continue
            generation, record, age = current
            ttl = float(record.get("ttl_s", self.ttl_s))
            ended = _ended_here(record)
            if age <= ttl and not ended:
                raise UserError(
                    f"{self.directory} is in use by {describe(record)}; its lease "
                    f"{self.url} was renewed {age:.0f} s ago. One run writes a run directory "
                    f"at a time: wait for it to end, or stop it (a lease not renewed for "
                    f"{ttl:.0f} s is taken over automatically)"
                )
            try:
                taken = self._write(generation)
            except _PreconditionFailed:
                continue  # someone else renewed or took it first: look again
            logger.warning(
                "took over the lease %s of %s (%s)",
                self.url,
                describe(record),
                "a process of this host that has ended"
                if ended
                else f"not renewed for {age:.0f} s",
            )
            return taken
        raise UserError(
            f"{self.directory}: could not take the lease {self.url} (other runs "
            "keep taking it); is another run starting on this directory?"
        )

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.generation = self._write(self.generation)
            except _PreconditionFailed:
                self._lost = (
                    f"the lease {self.url} of this run was taken over by another run "
                    f"(it was not renewed for {self.ttl_s:.0f} s)"
                )
                logger.error("%s", self._lost)
                return
            except Exception as err:  # a network error: try again at the next renewal
                logger.warning("renewing the lease %s failed: %s", self.url, err)

    def lost(self) -> str | None:
        return self._lost

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=_HTTP_TIMEOUT_S)
        if self._lost is None:
            try:
                self._request(
                    "DELETE", self._object_url(), params={"ifGenerationMatch": self.generation}
                )
            except UserError as err:  # it expires by itself
                logger.warning("could not release the lease %s: %s", self.url, err)


def acquire(directory: storage.PathLike, what: str, name: str = LOCK_NAME) -> RunLock | None:
    """Locks the run directory ``directory`` for the command ``what`` (process 0 of a
    multi-process run; the others learn the outcome). Raises ``UserError`` naming the
    holder when another run has it. The lock is held until :func:`release_all`."""
    import jax
    import numpy as np

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = (
                Lease(directory, what, name)
                if storage.is_remote(directory)
                else FileLock(directory, what, name)
            )
        except UserError as err:
            error = str(err)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            error = f"process 0 could not lock the run directory {directory} (see its message)"
    if error is not None:
        raise UserError(error)
    if lock is not None:
        _HELD.append(lock)
    return lock


def check_held() -> None:
    """Raises ``UserError`` when a lock of this process was lost (a ``gs://`` lease taken
    over by another run): call it before writing anything that a resumed run trusts."""
    for lock in _HELD:
        reason = lock.lost()
        if reason:
            raise UserError(f"{lock.directory}: {reason}; stopped before writing beside it")


def release_all() -> None:
    """Releases every lock this process holds (the CLI calls it when a command ends)."""
    while _HELD:
        lock = _HELD.pop()
        try:
            lock.release()
        except Exception as err:  # releasing never hides the command's own outcome
            logger.warning("releasing the lock of %s failed: %s", lock.directory, err)
