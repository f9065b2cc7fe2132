"""One writer per output folder: a lock file that needs no flock/fcntl, so it also holds on NFS or Lustre
across hosts; how holders, heartbeats and take-overs work is in docs/cluster.md ("One job per output folder")."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import torch.distributed as dist

from hidream_ft.errors import UserError

LOCK_NAME = "run.lock"
HISTORY_NAME = "run.lock.history"
HEARTBEAT_S = 15.0
# A holder on another host whose heartbeat is older than this is taken for dead; well above HEARTBEAT_S, so
# that a slow filesystem or a paused process does not lose its lock.
STALE_AFTER_S = 180.0


class OutputFolderLocked(UserError):
    """Another job writes into the output folder, or took it over from this one."""


def _boot_id() -> str:
    """Changes with every boot: a pid recorded before a reboot says nothing about the processes after it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), which tells a pid reused by a new process from the one
    recorded; None when no such process runs (a zombie, dead but not yet reaped, runs no more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return None if fields[0] == "Z" else fields[19]


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['job']}" if holder.get("job") else ""
    return f"host {holder['host']}, pid {holder['pid']}{job}, since {holder['started']}"


class OutputLock:
    """The lock of ``folder``, held from :meth:`acquire` to :meth:`release` by one process (rank 0 of a job)."""

    def __init__(self, folder: str | Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.record = {
            "host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "pid_start": process_start(os.getpid()),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "job": os.environ.get("SLURM_JOB_ID"), "restart": os.environ.get("SLURM_RESTART_COUNT"),
            "token": uuid.uuid4().hex,
        }
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- taking and giving back ------------------------------------------------------------------------------

    def acquire(self) -> OutputLock:
        """Take the lock, or raise :class:`OutputFolderLocked` naming the live holder; a dead holder's lock is
        taken over."""
        self.folder.mkdir(parents=True, exist_ok=True)
        # Written in full under a name of our own, then linked into place: link() fails when the lock exists
        # (atomic on NFS too), and a reader never sees a half-written lock.
        mine = self.folder / f".{LOCK_NAME}.{self.record['token']}"
        mine.write_text(json.dumps(self.record))
        taken_over = None
        try:
            while True:
                try:
                    os.link(mine, self.path)
                    break
                except FileExistsError:
                    pass
                holder = self.read(self.path)
                if holder is None:  # released meanwhile
                    continue
                reason = self.stale_reason(holder)
                if reason is None:
                    raise OutputFolderLocked(f"{self.folder} is in use by another run ({describe(holder)}); "
                                             f"wait for it to end, or use another logging.output_dir")
                if self._remove_stale(holder):
                    taken_over = {"token": holder["token"], "holder": describe(holder), "reason": reason}
        finally:
            mine.unlink(missing_ok=True)
        self._log("acquired", took_over=taken_over)
        self._heartbeat = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
        self._heartbeat.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        holder = self.read(self.path)
        if holder is not None and holder["token"] == self.record["token"]:
            self._log("released")
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def ensure_held(self) -> None:
        """Raise :class:`OutputFolderLocked` if another run has taken the lock over (this one was judged dead),
        before this one writes over its files."""
        holder = self.read(self.path)
        if holder is None or holder["token"] != self.record["token"]:
            taker = f" by another run ({describe(holder)})" if holder else ""
            raise OutputFolderLocked(f"{self.folder}: this run's lock was taken over{taker}; stopping so that two "
                                     "runs do not write into the same folder")

    # -- stale holders ---------------------------------------------------------------------------------------

    def stale_reason(self, holder: dict) -> str | None:
        """Why ``holder`` is dead, or None while it may be alive."""
        me = self.record
        if holder.get("job") and holder["job"] == me["job"] and holder.get("restart") != me["restart"]:
            return f"an earlier start of SLURM job {holder['job']}"
        if holder["host"] == me["host"] and holder["boot_id"] == me["boot_id"]:
            start = process_start(holder["pid"])
            if start is None:
                return f"process {holder['pid']} is gone"
            return f"pid {holder['pid']} now belongs to another process" if start != holder["pid_start"] else None
        if holder["host"] == me["host"]:
            return f"{me['host']} rebooted"
        try:
            silent = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released"
        return f"no heartbeat for {silent:.0f} s" if silent > self.stale_after_s else None

    def _remove_stale(self, holder: dict) -> bool:
        """Move the stale lock ``holder`` aside under a name of our own; rename() succeeds for one contender
        only. Returns whether we removed it (False: another contender did first)."""
        aside = self.folder / f".{LOCK_NAME}.stale.{self.record['token']}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        moved = self.read(aside)
        if moved is not None and moved["token"] != holder["token"]:
            # A contender took the lock between our reading and our rename: give it back (a later rename by
            # a third contender makes the new holder fail its ensure_held check rather than share the folder).
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink()
            return False
        aside.unlink(missing_ok=True)
        return True

    # -- helpers ---------------------------------------------------------------------------------------------

    @staticmethod
    def read(path: Path) -> dict | None:
        """The holder recorded in the lock file ``path``; None when there is none."""
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None

    def _beat(self) -> None:
        """Refresh the lock's modification time, which other hosts read as a sign of life."""
        while not self._stop.wait(self.heartbeat_s):
            holder = self.read(self.path)
            if holder is None or holder["token"] != self.record["token"]:
                return  # taken over: ensure_held reports it before the next write
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def _log(self, event: str, **details) -> None:
        """One JSON line per change of holder in the folder's lock history; only the holder appends."""
        entry = {"event": event, "time": time.time(), **{k: self.record[k] for k in ("host", "pid", "job", "token")},
                 **{k: v for k, v in details.items() if v is not None}}
        with open(self.folder / HISTORY_NAME, "a") as f:
            f.write(json.dumps(entry) + "\n")


def lock_output_folder(folder: str | Path, rank: int) -> OutputLock | None:
    """Rank 0 takes the lock of ``folder`` (returned; None on other ranks); a collective: every rank raises
    :class:`OutputFolderLocked` when it is held by a live run."""
    lock, problem = None, None
    if rank == 0:
        try:
            lock = OutputLock(folder).acquire()
        except OutputFolderLocked as e:
            problem = str(e)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        outcome = [problem]
        dist.broadcast_object_list(outcome, src=0)
        problem = outcome[0]
    if problem is not None:
        raise OutputFolderLocked(problem)
    return lock
