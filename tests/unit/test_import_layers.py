"""Import boundaries the layering relies on, checked in a fresh interpreter (the linter checks the graph;
these check what an import actually loads)."""

import subprocess
import sys


def _loaded(module: str, heavy: str) -> bool:
    code = f"import sys, {module}; print({heavy!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip() == "True"


def test_http_guard_client_and_gen_records_load_without_torch():
    # A rollout node talking to a remote guard needs no torch: ModerationItem lives in saferl.types.
    assert not _loaded("saferl.guard.remote", "torch")
    assert not _loaded("saferl.guard.gen", "torch")
