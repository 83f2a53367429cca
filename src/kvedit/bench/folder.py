"""The files of a `kvedit bench` folder: checking a folder before use, locking it for one process, reading and
appending cases.jsonl (`data.jsonl`)."""

from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import json
import os
import shlex
import socket
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.jsonl import append_jsonl, read_jsonl

#: the lock file in a bench folder: an flock held by the process that runs the folder, and who that is (JSON)
LOCK_FILE = ".kvedit-lock"
#: a sequential run's per-batch records (`bench.seqrun`), read by the reports
SEQUENCE_FILE = "sequence.jsonl"


class BenchError(ValueError):
    """A bench setting is invalid or conflicts with the run already in the output folder."""


class FolderInUseError(BenchError):
    """Another process holds the bench folder's lock."""


def check_bench_folder(out: str | Path) -> Path:
    """Refuse an output folder that is a file, holds another command's results, or a damaged config.json
    (before anything is loaded or written)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out} is an existing file; expected a folder (new, or a bench folder to resume)")
    config = out / "config.json"
    if config.exists():
        try:
            stored = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BenchError(
                f"{config} is not valid JSON ({err}); it is not a bench folder kvedit wrote. "
                "Remove the file or choose another --out"
            ) from None
        if not isinstance(stored, dict) or "dataset" not in stored:
            raise BenchError(f"{config} is not a kvedit bench configuration (no 'dataset' key); choose another --out")
    elif (out / "cases.jsonl").exists():
        raise BenchError(
            f"{out} holds a cases.jsonl that kvedit bench did not write (no config.json); choose another --out"
        )
    _refuse_if_locked(out)
    return out


def _holder(fd: int) -> dict[str, Any]:
    """Who the lock file names (empty: nobody, or a holder still writing its entry)."""
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """'pid 123 on host h, running `kvedit bench …` since 2024-…' from a lock file's entry."""
    if not holder.get("pid"):
        return "a process that is just starting (its details are not written yet)"
    return (
        f"pid {holder['pid']} on host {holder.get('host', '?')}, running `{holder.get('command', '?')}` "
        f"since {holder.get('started', '?')}"
    )


def _held_by_this_process(holder: dict[str, Any]) -> bool:
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def _busy(out: Path, holder: dict[str, Any]) -> FolderInUseError:
    return FolderInUseError(
        f"{out} is in use by another kvedit process: {describe_holder(holder)}. Two processes "
        "on one folder would both run every case; wait for it to finish (or stop it), or "
        "choose another --out"
    )


def _refuse_if_locked(out: Path) -> None:
    """Raise `FolderInUseError` if another process holds `out`'s lock (looks only: creates and keeps nothing)."""
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        if not _held_by_this_process(holder):
            raise _busy(out, holder) from None
    except OSError:
        pass  # a file system without locks: `lock_bench_folder` says so
    finally:
        os.close(fd)  # releases the probe's shared lock (never a lock this process holds on another descriptor)


def lock_bench_folder(out: str | Path, wait: float = 0.5) -> None:
    """Hold `out`'s lock until this process exits (creating the folder), or raise `FolderInUseError` naming the
    process that holds it (pid, host, command, since when).

    The lock is an flock on `out/.kvedit-lock`: the kernel drops it when the holder exits, however it ends (kill
    -9 included), so a lock never outlives its process. The holder writes who it is into the file for the message;
    an entry left by a process that ended without clearing it (killed) is taken over with a warning. Taking the
    lock again in the process that holds it is a no-op. `wait`: seconds to retry first (another process's
    `check_bench_folder` looks at the lock for an instant). Child processes started with fork share the lock; Ray
    workers, which never touch the folder, do not."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise BenchError(f"cannot write the lock file {path}: {err.strerror}; choose another --out") from None
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder(fd)
            if _held_by_this_process(holder):
                os.close(fd)
                return
            if time.monotonic() >= deadline:
                os.close(fd)
                raise _busy(out, holder) from None
            time.sleep(0.05)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(
                f"cannot lock {out} ({err.strerror}): make sure no other kvedit bench uses it at the same time",
                stacklevel=2,
            )
            return
    stale = _holder(fd)
    if stale.get("pid"):
        gone = (
            "is no longer running"
            if stale.get("host") == socket.gethostname() and not _alive(stale["pid"])
            else "no longer holds it"
        )
        warnings.warn(
            f"{out}: taking over the lock left by {describe_holder(stale)}, which {gone} (it did not end "
            "cleanly; cases.jsonl keeps what it finished)",
            stacklevel=2,
        )
    entry = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(entry) + "\n").encode(), 0)
    atexit.register(_release, fd, os.getpid())  # the descriptor stays open (and the lock held) until then


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(fd: int, holder_pid: int) -> None:
    """At exit: clear the entry (so the next holder sees a clean end), then drop the lock. A forked child that
    exits through atexit only closes its copy: the entry is its parent's."""
    try:
        if os.getpid() == holder_pid:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_cases_file(path: Path) -> list[dict[str, Any]]:
    """Records of cases.jsonl; a torn last line (a killed write) is dropped with a warning (`data.jsonl`)."""
    return read_jsonl(path)


def runs_on_file(path: Path) -> set[str]:
    """The run names cases.jsonl holds records of (damaged lines are left to `load_cases_file` to report)."""
    runs = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                runs.add(json.loads(line)["run"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return runs


def append_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append records as JSON lines and flush them to disk (a finished batch is never lost); a torn last line
    left by a killed run is cut off first."""
    append_jsonl(path, records)


def sequence_records(out: Path, run: str | None = None) -> list[dict[str, Any]]:
    """sequence.jsonl's records (of `run`), the last one per (run, batch), in batch order."""
    last: dict[tuple[str, int], dict[str, Any]] = {}
    for record in read_jsonl(out / SEQUENCE_FILE):
        if run is None or record["run"] == run:
            last[(record["run"], record["batch"])] = record
    return sorted(last.values(), key=lambda r: (r["run"], r["batch"]))
