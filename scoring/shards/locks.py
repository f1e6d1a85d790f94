"""One writer per output: an advisory lock (fcntl.flock) on a lock file in the output folder.

`score` and `add-model` hold `.lock.task-I` of their output folder for task I, `finalize` holds every task's,
`train` holds `.lock.train` of its run folder, `reweight` `.lock.reweight` of its output, `project` `.NAME.lock.project`
beside its output NAME. The lock file records the holder's pid, host and command, so a
second writer is refused with a message naming them. A lock is the kernel's, not the file's: when the holder
dies (even by SIGKILL) the kernel releases it, so a lock file left behind by a dead process never blocks
anyone, and the next writer takes it over. A process removes its lock files when it releases them, and at exit. flock works on local file systems and on NFS (Linux emulates it
with fcntl byte-range locks there); on a file system without locking the lock cannot be taken and the writer
stops with a WriteError.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from scoring.shards.files import WriteError

HOLDER_WAIT_S = 1.0  # how long a refused writer waits for a just-started holder to record its pid
OPEN_ATTEMPTS = 100  # a released lock file is removed; reopening it by name is retried this often


class OutputBusyError(ValueError):
    """Another live process holds the lock of this output; the message names its pid, host and command."""


@dataclass
class OutputLock:
    """A held lock: the lock file and its open descriptor (the flock lives as long as the descriptor)."""

    path: Path
    fd: int | None

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order: a writer that opened the old file before the
        removal finds it unlinked once it gets the lock, and opens the new one)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        _HELD.pop(str(self.path.resolve()), None)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# The locks this process holds. A process takes each lock once: a later call in the same process (a retry
# after an exception that still references the earlier call's frame) takes the lock over instead of being
# refused by itself. Locks exclude other processes, not threads of one process.
_HELD: dict[str, OutputLock] = {}


@atexit.register
def _release_all() -> None:
    """At exit (also after an error), remove this process's lock files; the kernel would drop the locks anyway."""
    for lock in list(_HELD.values()):
        lock.release()


def task_lock_path(out: Path, task_index: int) -> Path:
    return Path(out) / f".lock.task-{task_index}"


def _holder(fd: int) -> dict:
    """The holder's record in the lock file ({} while it has not written it yet)."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        raw = os.pread(fd, 4096, 0)
        try:
            return json.loads(raw)
        except ValueError:
            if time.monotonic() > deadline:
                return {}
            time.sleep(0.05)


def hold_lock(path: Path, command: str, target: str) -> OutputLock:
    """Take the lock `path` for `command` (e.g. "tokenprio score") writing `target` (e.g. "task 0 of shards/"),
    without waiting. Raises OutputBusyError naming the live holder; WriteError when the lock file cannot be made."""
    path = Path(path)
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key].release()
    fd = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(OPEN_ATTEMPTS):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                fd = None
                who = (f"{holder.get('command', 'another tokenprio process')} (pid {holder.get('pid')} on {holder.get('host')}, "
                       f"since {holder.get('started')})") if holder else "another process (just started: its pid is not recorded yet)"
                raise OutputBusyError(
                    f"{target}: {who} is writing it; two writers would interleave. Wait for it to finish, or stop it"
                    + (f" (`kill {holder['pid']}` on {holder.get('host')})" if holder.get("pid") else "")
                    + f", then rerun. (Lock file {path}; a lock of a process that died is released by the kernel and never blocks.)"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released (and removed) the file between our open and our flock: open the new one
            fd = None
        else:
            raise OSError(f"{path} kept being replaced while {OPEN_ATTEMPTS} attempts tried to lock it")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    except OSError as error:
        if fd is not None:
            os.close(fd)
        raise WriteError(path, error) from error
    lock = OutputLock(path, fd)
    _HELD[key] = lock
    return lock
