"""A benchmark's printed output, also written to a results file with the command, the date and the machine.

`with sampled_load() as loads:` fills `loads` with the 1-minute load average every 10 s while its block runs.
`with recorded(args.out):` around a benchmark's main body tees stdout; on exit (also after a failed check)
the file gets the command line, the UTC date, the CPU count, the load average at start and end, the torch
version, and the output.
The README quotes figures only from such files under benchmarks/results/.
"""

from __future__ import annotations

import io
import os
import shlex
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Tee(io.TextIOBase):
    def __init__(self, *streams: io.TextIOBase) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextmanager
def recorded(out: str | None) -> Iterator[None]:
    """Tee stdout into `out` (Markdown), headed by how and where it was produced; nothing when `out` is None."""
    if out is None:
        yield
        return
    captured, stdout = io.StringIO(), sys.stdout
    started, load_start = time.gmtime(), os.getloadavg()[0]
    sys.stdout = _Tee(stdout, captured)
    try:
        yield
    finally:
        sys.stdout = stdout
        import torch

        command = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
        load = max(load_start, os.getloadavg()[0])
        busy = (f"the CPUs were oversubscribed (load up to {load:.1f} on {os.cpu_count()} CPUs: other jobs ran "
                "beside this one), so absolute times are noisy" if load > (os.cpu_count() or 1)
                else f"the CPUs were not oversubscribed (load up to {load:.1f} on {os.cpu_count()} CPUs)")
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"# {Path(sys.argv[0]).stem}\n\n"
            f"- command: `{command}` (from the repository root)\n"
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', started)}\n"
            f"- machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; 1-minute load average "
            f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n"
            f"- note: {busy}; ratios compare the two sides measured in the same run\n\n"
            f"```\n{captured.getvalue().strip()}\n```\n")


@contextmanager
def sampled_load(every_s: float = 10.0) -> Iterator[list[float]]:
    """The 1-minute load average every `every_s` seconds while the block runs: a list filled as it goes (a
    benchmark's sides run beside other jobs on a shared machine; their times mean little without it)."""
    loads: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            loads.append(os.getloadavg()[0])

    threading.Thread(target=sample, daemon=True).start()
    try:
        yield loads
    finally:
        done.set()
