"""`ray.address` that nothing answers fails in seconds, naming the address (ray.init retries for minutes)."""

import socket
import time

import pytest

from saferl.actor_group import check_ray_address, ray_endpoint, start_ray


def test_ray_endpoint_parses_client_and_gcs_addresses():
    assert ray_endpoint("ray://10.1.2.3") == ("10.1.2.3", 10001)  # Ray Client's default port
    assert ray_endpoint("ray://10.1.2.3:23456/") == ("10.1.2.3", 23456)
    assert ray_endpoint("10.1.2.3:6380") == ("10.1.2.3", 6380)
    with pytest.raises(ValueError, match="ray.address=10.1.2.3:"):
        ray_endpoint("10.1.2.3")  # no port


def test_an_address_nothing_answers_fails_at_once_naming_it():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"ray.address=ray://127.0.0.1:{port}"):
        check_ray_address(f"ray://127.0.0.1:{port}")
    assert time.monotonic() - start < 5


def test_an_address_that_accepts_connections_passes():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        check_ray_address(f"ray://127.0.0.1:{sock.getsockname()[1]}")  # raises ConnectionError if refused


def test_start_ray_probes_before_ray_init(monkeypatch, tmp_path):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init ran for a dead address"))
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="ray.address=127.0.0.1:9"):
        start_ray("127.0.0.1:9", None, str(tmp_path))
    assert time.monotonic() - start < 30
