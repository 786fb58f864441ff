"""files.py -- files that survive a crash of the machine, and one run at a time per output folder. Standard library.

    with atomic_file("out/train.jsonl") as f:       # written beside, fsynced, renamed in, the folder fsynced:
        f.write(...)                                 # after a power cut the file is the old one or the new one
    with folder_lock("out/train", "train"):          # a second run on the folder: FolderBusy naming the first's PID
        ...
    with build_lock("out/cache/key", on_wait):       # one process builds a cached artefact; the others wait for it
        ...

A rename alone is not enough after a power cut: the file's data and the folder entry reach the disk in no set
order, so the renamed file can come back empty or partial. fsync the file before the rename and the folder after it.
The lock is fcntl.flock on <folder>/rmd.lock: the kernel drops it when the process ends, however it ends (kill -9
included), so a stale lock file never blocks a run.
"""
import contextlib
import json
import os
import shutil
import time

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None


def fsync_dir(path):
    """Flush a folder's entries (new, renamed, removed files) to the disk."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path):
    """fsync every file under a folder and every folder in it (before the folder is renamed into place)."""
    for folder, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def replace(src, dst):
    """os.replace(src, dst) made durable: the folder that holds dst is fsynced after the rename (src's contents
    must have been fsynced by the caller: atomic_file and fsync_tree do)."""
    os.replace(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


def remove(path):
    """Remove a file or a folder, whichever `path` is (nothing if it is neither)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_file(path, mode="w", encoding="utf-8"):
    """Write `path` whole or not at all: a temporary file beside it, fsynced, renamed over it, the folder fsynced.
    An exception inside the block leaves the old file and no temporary one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    remove(tmp)  # left by a crash (a file, or a folder of someone else's making)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------------------- one run per output folder

LOCK_NAME = "rmd.lock"


class FolderBusy(ValueError):
    """Another process runs in this output folder."""


_held = set()  # the lock files this process holds (a nested folder_lock on one of them is a no-op)


def _holder(f):
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except ValueError:
        return {}


@contextlib.contextmanager
def build_lock(path, on_wait):
    """Hold <path>.lock exclusively while `path` is built (fcntl.flock: released when the process exits, kill -9
    included). A process that finds another building calls on_wait(that builder's PID or '?'), then blocks until
    the build is done: exactly one process builds, the others reuse what it built."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if fcntl is None:
        print(f"warning: no fcntl on this platform: nothing stops two processes building {path} at once", flush=True)
        yield
        return
    with open(path + ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            on_wait(f.read().strip() or "?")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def folder_lock(folder, command):
    """Hold an exclusive lock on `folder` (created if missing) for the block; FolderBusy (one line, naming the
    holder's PID and command) if another process holds it. Re-entrant within a process."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.realpath(os.path.join(folder, LOCK_NAME))
    if path in _held:
        yield
        return
    if fcntl is None:
        print(f"warning: no fcntl on this platform: nothing stops a second run in {folder}", flush=True)
        yield
        return
    f = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            who = f"PID {holder['pid']}, rmd {holder.get('command', '?')} started {holder.get('started', '?')}" \
                if "pid" in holder else "PID unknown"
            raise FolderBusy(f"{folder} is in use by another run ({who}): wait for it to end, or give another "
                             "--out") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "command": command,
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        f.flush()
        _held.add(path)
        try:
            yield
        finally:
            _held.discard(path)
    finally:
        f.close()  # releases the lock (the file stays: removing it would race with a run that just opened it)
