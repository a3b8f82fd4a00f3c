"""Who uses a training's resume file: one live process at a time, and no lock file left behind.

The resume file of a training (``<name>.resume.pt``, see
:class:`dcml.algorithm.training.Trainer`) is shared by every re-run of the same
training so a killed run resumes. Two runs of the same training at once must not
write it both: the first holds an exclusive ``flock`` on ``<name>.resume.pt.lock``
beside it, a second one trains on a private file (``<name>.resume.<pid>.pt``).

The lock file exists only while its holder trains: the holder removes it when it
is done. A process that opened the file just before it was removed may lock the
removed file; it checks after locking that the name still refers to the file it
locked (same inode) and tries again otherwise, so two live holders never coexist.
A process killed while holding the lock leaves the (empty) file; the kernel has
released its lock, and the next run takes it over and removes it when done.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def lock_file(resume_path: Path) -> Path:
    return resume_path.with_name(resume_path.name + ".lock")


@contextlib.contextmanager
def hold(resume_path: str | os.PathLike) -> Iterator[Path]:
    """Yield the resume file this process uses: ``resume_path`` with its lock held, or a
    private one when another live process holds it. The lock file is removed on exit."""
    import fcntl

    resume_path = Path(resume_path)
    lock_path = lock_file(resume_path)
    resume_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock_path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            yield resume_path.with_name(f"{resume_path.stem}.{os.getpid()}.pt")
            return
        try:
            current = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()  # locked a file its last holder had just removed: lock the one there now
    try:
        yield resume_path
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        handle.close()
