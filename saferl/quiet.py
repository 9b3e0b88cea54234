"""Quiet logs: the known-harmless lines of vLLM, Ray, DeepSpeed and torch, dropped from a SafeRL driver's output.

Owns `HARMLESS` (each pattern with why it is harmless), `is_harmless(line)` and `quiet_output()`, which wraps
the process's `sys.stdout` and `sys.stderr` in a `LineFilter`, and `is_quiet()`, which a process that starts
its own workers (the toy world's build) reads to give them the same filter. The driver is the one place every line
reaches the user through: Ray forwards each actor's stdout and stderr (C++ warnings and progress bars
included) to it as whole lines printed on `sys.stdout`/`sys.stderr`, so filtering there needs nothing in the
actors. `logging.verbose=true` (or `-v`) leaves the streams alone and shows everything.

Choices and shortcuts:
- A line is dropped only when a pattern matches it (after stripping colours and Ray's `(Role pid=N)` prefix)
  or when it is a blank line forwarded from an actor (a closed progress bar); anything else, every real
  warning and error included, goes through unchanged.
- A line is judged in segments: each carriage return starts a new one (a progress bar redrawing itself, or
  Ray forwarding an actor's bar while the driver's own bar holds the line open). A segment is judged when its
  newline or the next carriage return arrives, or at once when it starts with a carriage return: a harmless
  one is dropped up to its end, any other is written at once, so the driver's own progress bar still
  animates. `flush()` writes a pending partial.
- What the driver's own libraries print straight to file descriptor 2 from C code, not through
  `sys.stderr` (only when roles run in-process, `run.executor=local`), is not filtered.
"""

from __future__ import annotations

import re
import sys
import threading
from typing import Any, TextIO

# (pattern, why it is harmless). Searched in the line after its Ray prefix; keep them specific.
HARMLESS: tuple[tuple[str, str], ...] = (
    (r"RotaryEmbedding: Failed to load weights",
     "vLLM's layerwise weight reload names the modules without weights (rotary embeddings hold only "
     "buffers) at every weight sync; every real weight is loaded"),
    (r"The global random seed is set to \d+\. Since VLLM_ENABLE_V1_MULTIPROCESSING",
     "vLLM in-process on CPU (runtime.CPU_ONLY_ENV): rollouts are seeded on purpose"),
    (r"does not officially support disabling chunked prefill", "chunked prefill is off on CPU on purpose"),
    (r"Enforce eager set, disabling torch\.compile", "eager mode is SafeRL's choice on CPU"),
    (r"Inductor compilation was disabled by user settings", "TORCHDYNAMO_DISABLE=1 on CPU (runtime.CPU_ONLY_ENV)"),
    (r"Triton is not installed|Model Runner V2 requires Triton|Triton not available, find_triton_kernels",
     "no Triton on a CPU-only machine; vLLM and torch use their CPU paths"),
    (r"(libtcmalloc|libiomp) is not found in LD_PRELOAD", "a speed hint for large CPU models"),
    (r"NUMA binding: Using MEMBIND policy", "a notice of vLLM's CPU worker memory binding"),
    (r"CPU backend doesn't allow to use `torch\.set_num_threads` after the thread binding",
     "threads are pinned by SafeRL before vLLM starts (runtime.configure_process)"),
    (r"Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it",
     "DeepSpeed's notice on a machine without a GPU"),
    (r"Token authentication is enabled for this Ray cluster", "a notice; the local Ray listens on loopback"),
    (r"Started a local Ray instance\.", "Ray's start banner; the plan above says where roles run"),
    (r"^(Loading safetensors checkpoint shards|Loading weights|Writing model shards):\s+\d+%",
     "per-actor weight loading and saving bars"),
)
_PATTERN = re.compile("|".join(f"(?:{p})" for p, _ in HARMLESS))
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\((?:[\w.:-]+ )?pid=\d+(?:, ip=[\d.]+)?\)\s?")


def is_harmless(line: str) -> bool:
    """Whether one output line (without its newline) is a known-harmless message (see `HARMLESS`)."""
    text = _ANSI.sub("", line).rstrip("\r\n")
    body = _RAY_PREFIX.sub("", text, count=1)
    if body != text and not body.strip():
        return True  # a blank line forwarded from an actor: what a closed progress bar leaves
    parts = [part.strip() for part in body.split("\r") if part.strip()]  # a bar's redraws: all must match
    return bool(parts) and all(_PATTERN.search(part) for part in parts)


class LineFilter:
    """A text stream that drops harmless lines and passes everything else to `stream` (see the module)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._pending = ""  # the current line's text not yet judged
        self._state = "new"  # new | dropping (judged harmless) | shown (a part already written)
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            for piece in re.split(r"(?<=\n)|(?=\r)", text):
                if not piece:
                    continue
                if piece.startswith("\r") or _RAY_PREFIX.match(_ANSI.sub("", piece)):
                    # A carriage return or an actor's line forwarded by Ray starts a new segment, judged on its
                    # own: an actor's saving bar that arrives while the driver's bar holds the line open is dropped.
                    self._end_segment()
                self._pending += piece
                if piece.endswith("\n"):
                    line, state = self._pending, self._state
                    self._pending, self._state = "", "new"
                    if state == "shown" or (state == "new" and not is_harmless(line)):
                        self.stream.write(line)
                elif self._pending.startswith("\r"):
                    self._judge_partial()
        return len(text)

    def _end_segment(self) -> None:
        if self._pending:
            self._judge_partial()
        self._pending, self._state = "", "new"

    def _judge_partial(self) -> None:
        if not self._pending.strip("\r"):
            return  # nothing to judge yet
        if self._state == "new" and is_harmless(self._pending):
            self._state = "dropping"
        if self._state != "dropping":
            self.stream.write(self._pending)
            self._state = "shown"
        self._pending = ""

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._judge_partial()
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer, ...: the real stream's
        return getattr(self.stream, name)


def quiet_output() -> None:
    """Filter this process's `sys.stdout` and `sys.stderr` from now on (idempotent). Call it before Ray and the
    model libraries are imported, so that the logging handlers they create write through the filter."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, LineFilter):
            setattr(sys, name, LineFilter(stream))


def is_quiet() -> bool:
    """Whether `quiet_output` filters this process. A spawned worker starts with plain streams that write to the
    terminal past this process's filter, so whoever spawns one passes `quiet_output` on as its initializer."""
    return isinstance(sys.stdout, LineFilter)
