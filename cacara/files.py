"""Writing outputs so that a killed run leaves nothing half-written, and two runs never share a folder.

Why both: a step's output folder is what the next step (or ``dvc repro`` a day later) trusts. A file under
its final name must therefore be whole (written to a temporary name, then renamed: a rename within one
folder is atomic on POSIX filesystems), and a second run writing the same folder at the same time would
interleave two datasets into one that neither run wrote, so it is refused instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


class OutputBusy(RuntimeError):
    """Another live process holds the output folder."""


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) so that ``path`` is either absent, its old content or the whole new one."""
    p = Path(path)
    tmp = p.with_name(p.name + TMP_SUFFIX)
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(p)
    return p


def lock_path(out_dir: str | Path) -> Path:
    """The lock sits beside the folder, not in it: a dvc output's hash must not change with a lock file.
    The folder is resolved first, so a symlink to it or a path through ``..`` meets the same lock."""
    out = Path(out_dir).resolve()
    if out.parent == out:
        raise ValueError(f"{out_dir}: a filesystem root is not an output folder")
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def exclusive_output(out_dir: str | Path, what: str) -> Iterator[None]:
    """Hold ``out_dir`` for this process while the block runs; raise OutputBusy if another run holds it.

    ``flock`` is released by the kernel when its holder dies, SIGKILL included, so a killed run never
    leaves a stale lock behind: the lock file may stay, the lock does not. The file records who holds it,
    so the refusal can say which run to wait for. On NFS mounted with ``nolock`` or ``local_lock`` the lock
    excludes runs on this host only.
    """
    path = lock_path(out_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a read-only parent (a volume's mount point): run, unguarded, and say so
        log.warning("cannot create the lock %s (%s): concurrent runs into %s are not prevented", path, exc, out_dir)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                # A filesystem without flock (some network mounts): say so, and do not block the run.
                log.warning("cannot lock %s (%s): concurrent runs into %s are not prevented", path, exc, out_dir)
            else:
                holder = _holder(fd)
                raise OutputBusy(f"{what}: another run ({holder}) is writing {out_dir}; wait for it to finish "
                                 "or choose another output folder") from None
        else:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": what}).encode())
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"{record.get('what', '?')}, pid {record.get('pid', '?')} on {record.get('host', '?')} " \
               f"since {record.get('since', '?')}"
    except (OSError, ValueError):
        return "holder unknown"
