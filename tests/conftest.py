"""Test set-up: offline, one thread per process, and the built toy world shared by the slow tests.

Offline and one thread are the test suite's choice (the same as the Makefile's), not the library's: SafeRL
itself leaves the model hub on. The default toy world is built once into the project cache
(`.cache/toyworld`, the same one `make train` uses), so a second `make test` or a `make train` after it
reuses it.
"""

import os

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                     "WANDB_MODE": "disabled"}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def toy_world_build():
    """(paths, metrics): the default toy world, built on first use (about 4 minutes on 2 cores), and the
    metrics its build measured when this session built it (these models, on disk, with this code), or None
    when it came from the cache (an earlier build measured it, perhaps with older code)."""
    import json

    from saferl.config import load_config
    from saferl.toyworld.build import ensure_built, toyworld_paths

    cfg = load_config(os.path.join(PROJECT_ROOT, "configs", "toy.yaml")).toyworld
    cfg.cache_dir = os.path.join(PROJECT_ROOT, cfg.cache_dir)
    cached = (toyworld_paths(cfg).root / "metrics.json").is_file()
    paths = ensure_built(cfg, stream_guard=True)  # the CARE and stream tests need it: trained on the idle core
    return paths, None if cached else json.loads((paths.root / "metrics.json").read_text())


@pytest.fixture(scope="session")
def toy_world(toy_world_build):
    """Paths of the default toy world, built on first use."""
    return toy_world_build[0]


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


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory, tiny_tokenizer):
    """(model dir, vocab size): a tiny random Qwen3 causal LM with a real tokenizer, saved as a model directory."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok_dir = tiny_tokenizer(["how", "to", "bake", "bread", "sure", "here", "sorry", "no"])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy")
    Qwen3ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), len(tok)


@pytest.fixture(scope="session")
def wait_http():
    """`wait(proc, url, log, timeout, pause)`: poll GET `url` until it answers 200, failing with the last of
    `log` (the server's output file) if the server process `proc` exits first; for tests that start a
    server in a subprocess."""
    import time

    import httpx

    def wait(proc, url: str, log, timeout: float, pause: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(pause)
        raise AssertionError(f"{url} did not answer within {timeout:g}s: {log.read_text()[-3000:]}")

    return wait
