"""Whether a server can be reached, asked once: the clients of the Hub and of Comet retry for half a minute
before they say no."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit


def unreachable(url: str, environ: Mapping[str, str] = os.environ, timeout_s: float = 5.0) -> str | None:
    """Why ``url``'s server cannot be reached in one TCP connection attempt, or None when it can. Behind a proxy
    (the client's way there) the proxy is what is tried: one that does not answer leads nowhere."""
    parts = urlsplit(url)
    proxy = _proxy(parts.scheme, environ)
    target = urlsplit(proxy if "://" in proxy else f"http://{proxy}") if proxy else parts
    host = target.hostname or url
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        what = f"the proxy {host}:{port}" if proxy else host  # (a proxy's user and password are not said)
        return f"{what} cannot be reached: {exc.strerror or exc}"
    return None


def _proxy(scheme: str, environ: Mapping[str, str]) -> str | None:
    """The proxy the clients (requests, httpx) take for ``scheme``: ``<scheme>_proxy``, else ``all_proxy``."""
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if environ.get(name):
            return environ[name]
    return None
