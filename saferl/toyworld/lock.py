"""`build_lock`: one process at a time builds a cached artefact (the toy world, its Stream guard); the others
wait for it and reuse what it built. Its own module so that `build` and `stream` can both use it without
importing each other."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<target>.lock` (next to `target`, created if missing) for the block: a
    second process building the same thing waits here, saying so, until the first is done (or dead: the
    kernel drops a `flock` with its process). Callers check again under the lock whether it is built."""
    import fcntl

    lock = target.with_name(target.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[toyworld] waiting for another process building {target} (lock {lock})", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock
