"""saferl.runtime and start_ray's actor environment: the library never switches the model hub off, actors get
the driver's offline switches only when it has them, and `run.torch_threads` reaches the driver and actors."""

import os

import pytest
import torch

from saferl.runtime import CPU_ONLY_ENV, OFFLINE_KEYS, actor_env, configure_process, thread_count


@pytest.fixture
def online(monkeypatch):
    """The hub switches unset, as on a GPU cluster that downloads Qwen/Qwen3-4B."""
    for key in OFFLINE_KEYS:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def restore_threads(monkeypatch):
    """Keep the suite at one torch thread and the thread variables as they were, whatever a test sets."""
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM"):  # undone after the test
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_ray(monkeypatch):
    """`start_ray` against a stand-in `ray.init` that records its arguments and starts nothing."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    return calls


def test_configure_process_leaves_the_hub_online(online, restore_threads):
    configure_process()
    assert [k for k in OFFLINE_KEYS if k in os.environ] == []


def test_actors_get_no_offline_switch_the_driver_does_not_have(online, fake_ray, tmp_path):
    from saferl.actor_group import start_ray

    start_ray(None, 2, str(tmp_path))
    env = fake_ray[0]["runtime_env"]["env_vars"]
    assert [k for k in OFFLINE_KEYS if k in env] == []


def test_actors_inherit_the_drivers_offline_switches(online, fake_ray, tmp_path, monkeypatch):
    from saferl.actor_group import start_ray

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    start_ray(None, 2, str(tmp_path))
    env = fake_ray[0]["runtime_env"]["env_vars"]
    passed = {k: env[k] for k in OFFLINE_KEYS if k in env}
    assert passed == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "0"}


def test_start_ray_hands_the_thread_setting_to_actors(fake_ray, tmp_path, restore_threads):
    from saferl.actor_group import start_ray

    start_ray(None, 2, str(tmp_path), torch_threads=3)
    env = fake_ray[0]["runtime_env"]["env_vars"]
    assert (env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) == ("3", "3")


def test_thread_count_rule():
    assert thread_count(0, gpu=False, omp_env=None) == 1  # 2-core CPU boxes: one thread per process
    assert thread_count(0, gpu=True, omp_env=None) is None  # GPU node: torch's own default
    assert thread_count(0, gpu=True, omp_env="6") == 6  # the user's OMP_NUM_THREADS
    assert thread_count(4, gpu=False, omp_env="1") == 4  # an explicit setting wins
    with pytest.raises(ValueError, match="run.torch_threads"):
        thread_count(-1, gpu=False, omp_env=None)


def test_actor_env_by_placement():
    cpu = actor_env(0, gpu=False, environ={})
    assert cpu["OMP_NUM_THREADS"] == "1" and CPU_ONLY_ENV.items() <= cpu.items()
    # GPU actors: no single-process vLLM, no eager-only torch, and no pinning by a driver on a CPU head node.
    gpu = actor_env(0, gpu=True, environ={"OMP_NUM_THREADS": "1"})
    assert not set(CPU_ONLY_ENV) & set(gpu) and "OMP_NUM_THREADS" not in gpu
    assert actor_env(8, gpu=True, environ={})["OMP_NUM_THREADS"] == "8"


@pytest.fixture
def set_threads(monkeypatch):
    """Record torch.set_num_threads calls. Reading torch.get_num_threads back is not possible in the suite:
    once a vLLM CPU engine ran in this process, vLLM replaces torch.set_num_threads with a no-op."""
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    return calls


def test_configure_process_applies_the_thread_setting(restore_threads, monkeypatch, set_threads):
    configure_process(3)
    assert set_threads == [3] and os.environ["OMP_NUM_THREADS"] == "3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    configure_process(0)  # automatic on this CPU-only machine
    assert set_threads == [3, 1] and os.environ["OMP_NUM_THREADS"] == "1"


def test_train_applies_run_torch_threads_to_the_driver(restore_threads, monkeypatch, set_threads):
    """`train` pins the driver with the config's setting before anything else runs."""
    import saferl.train
    from saferl.config import load_config

    class Stop(Exception):
        pass

    def stop(cfg):
        raise Stop

    monkeypatch.setattr(saferl.train, "check_endpoints", stop)
    with pytest.raises(Stop):
        saferl.train.train(load_config(None, ["run.torch_threads=2"]))
    assert set_threads == [2]


def test_a_negative_thread_count_is_refused_at_load():
    from saferl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"'run.torch_threads' must be >= 0 \(0 = automatic\), got -1"):
        load_config(None, ["run.torch_threads=-1"])
