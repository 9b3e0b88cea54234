"""Endpoints are health-checked at start: none up stops the run naming every URL; some down warns, naming
them."""

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saferl.config import load_config
from saferl.roles import check_endpoints
from saferl.serving.client import EndpointPool


def _server(ok_paths: set[str]):
    """A stand-in that answers GET `ok_paths` with 200 and anything else with 404."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200 if self.path in ok_paths else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def _down_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here any more
    return f"http://127.0.0.1:{port}"


def _pool(urls: list[str], what: str = "guard") -> EndpointPool:
    return EndpointPool(urls, token_env="SAFERL_TEST_NO_TOKEN", timeout_s=5.0, retries=0, backoff_s=0.0,
                        concurrency=4, what=what)


def test_no_endpoint_up_raises_naming_every_url():
    urls = [_down_url(), _down_url()]
    with pytest.raises(ConnectionError) as err:
        _pool(urls).check_health(("/health",), timeout_s=5.0)
    assert "guard.urls" in str(err.value) and all(u in str(err.value) for u in urls)


def test_some_endpoints_down_are_returned_and_the_pool_is_usable():
    good, server = _server({"/health"})
    bad = _down_url()
    dead = _pool([good, bad]).check_health(("/health",), timeout_s=5.0)
    server.shutdown()
    assert list(dead) == [bad] and "ConnectError" in dead[bad]


def test_an_openai_server_with_only_v1_models_counts_as_up():
    url, server = _server({"/v1/models"})
    assert _pool([url]).check_health(("/health", "/v1/models"), timeout_s=5.0) == {}
    with pytest.raises(ConnectionError, match="HTTP 404"):  # the saferl protocol needs its own /health
        _pool([url]).check_health(("/health",), timeout_s=5.0)
    server.shutdown()


@pytest.mark.parametrize("overrides, key", [
    (["guard.backend=http"], "guard.urls"),
    (["guard.backend=openai"], "guard.urls"),
    (["helpfulness.backend=http"], "helpfulness.urls"),
])
def test_check_endpoints_stops_when_a_remote_scorer_has_no_live_endpoint(overrides, key):
    dead = _down_url()
    pool = key.split(".")[0]
    cfg = load_config(None, [*overrides, f"{key}=[{dead}]"])
    with pytest.raises(ConnectionError) as err:
        check_endpoints(cfg)
    assert key in str(err.value) and dead in str(err.value) and f"{pool} server" in str(err.value)


def test_check_endpoints_warns_about_dead_endpoints_and_goes_on(capsys):
    good, server = _server({"/health"})
    dead = _down_url()
    check_endpoints(load_config(None, ["guard.backend=http", f"guard.urls=[{good},{dead}]"]))
    server.shutdown()
    out = capsys.readouterr().out
    assert f"guard endpoint {dead} is down" in out and good not in out
