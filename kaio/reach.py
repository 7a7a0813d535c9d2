"""Whether a server can be reached, asked once: the clients of the Hub and of Comet retry for half a minute
before they say no."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit

_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def unreachable(url: str, environ: Mapping[str, str] = os.environ, timeout_s: float = 5.0) -> str | None:
    """Why ``url``'s server cannot be reached in one TCP connection attempt, or None when it can (or when a proxy
    stands between: the client knows the way there, a direct connection would not)."""
    if any(environ.get(name) for name in _PROXY_VARIABLES):
        return None
    parts = urlsplit(url)
    host = parts.hostname or url
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{host} cannot be reached: {exc.strerror or exc}"
    return None
