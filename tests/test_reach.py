"""Whether a server can be reached, asked once (kaio.reach): proxies and the hosts they do not serve."""

from __future__ import annotations

import socket

from kaio.reach import unreachable


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_host_named_in_no_proxy_is_reached_directly_not_through_the_proxy():
    """An in-house Hub mirror beside a proxy for the internet: the clients go to the mirror directly, so a
    proxy that leads nowhere does not make the mirror unreachable."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}/api"
        dead_proxy = f"http://127.0.0.1:{_closed_port()}"

        assert unreachable(url, {"HTTP_PROXY": dead_proxy}, timeout_s=2).startswith("the proxy 127.0.0.1:")
        assert unreachable(url, {"HTTP_PROXY": dead_proxy, "NO_PROXY": "localhost,127.0.0.1"}, timeout_s=2) is None
        assert unreachable(url, {"http_proxy": dead_proxy, "no_proxy": "*"}, timeout_s=2) is None
        assert unreachable(url, {"HTTP_PROXY": dead_proxy, "NO_PROXY": "example.org"}, timeout_s=2) is not None
