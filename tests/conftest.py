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


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """`make(words) -> dir`: a small byte-level BPE tokenizer (Qwen3 special tokens, the toy ChatML template)
    trained in well under a second on rotations of `words` (plus the ChatML role names, which must be single
    tokens), for tests that need real token ids."""

    def make(words: list[str]) -> str:
        from saferl.toyworld.tokenizer import train_bpe_tokenizer

        words = [*words, "system", "user", "assistant"]
        corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20
        path = tmp_path_factory.mktemp("tokenizer")
        train_bpe_tokenizer(corpus, vocab_size=400).save_pretrained(path)
        return str(path)

    return make
