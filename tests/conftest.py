"""Test set-up: offline, one thread per process, and the built toy world shared by the slow tests.

The default toy world is built once into the project cache (`.cache/toyworld`, the same one `make train`
uses), so a second `make test` or a `make train` after it reuses it.
"""

import os

from saferl.runtime import CPU_ENV

for _key, _value in CPU_ENV.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def toy_world():
    """Paths of the default toy world, built on first use (about 4 minutes on 2 cores)."""
    from saferl.config import load_config
    from saferl.toyworld.build import ensure_built

    cfg = load_config(os.path.join(PROJECT_ROOT, "configs", "toy.yaml")).toyworld
    cfg.cache_dir = os.path.join(PROJECT_ROOT, cfg.cache_dir)
    return ensure_built(cfg)
