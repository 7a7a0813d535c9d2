"""Whether a server can be reached, asked once: the clients of the Hub and of Comet retry for half a minute
before they say no."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit

_PROXY_FAILURES = (502, 503, 504)  # what a proxy answers when it cannot reach the server behind it


def unreachable(url: str, environ: Mapping[str, str] = os.environ, timeout_s: float = 5.0) -> str | None:
    """Why ``url``'s server cannot be reached, or None when it can: one TCP connection attempt, or behind a proxy
    (the client's way there) one request through it: a proxy that is down, silent, or answers that it cannot
    reach the server leads nowhere."""
    parts = urlsplit(url)
    proxy = _proxy(parts.scheme, environ)
    if proxy and not _bypassed(parts.netloc, environ):
        return _through(proxy, url, timeout_s)
    host = parts.hostname or url
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{host} cannot be reached: {exc.strerror or exc}"
    return None


def _through(proxy: str, url: str, timeout_s: float) -> str | None:
    """One HEAD request for ``url`` through ``proxy``: any answer of the server (a 404, a 401) is a way there."""
    import urllib.error
    import urllib.request

    where = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    said = f"the proxy {where.hostname}:{where.port or 80}"  # (a proxy's user and password are not said)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({urlsplit(url).scheme: proxy}))
    try:
        opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError as exc:
        return (
            f"{said} cannot reach {urlsplit(url).hostname} (HTTP {exc.code})" if exc.code in _PROXY_FAILURES else None
        )
    except (OSError, ValueError) as exc:  # refused, silent (a timeout), a tunnel it would not open
        reason = getattr(exc, "reason", None) or exc
        return f"{said} leads nowhere: {getattr(reason, 'strerror', None) or reason}"
    return None


def _bypassed(netloc: str, environ: Mapping[str, str]) -> bool:
    """``no_proxy`` names the host (an in-house Hub mirror, say): the clients go there directly, not through the proxy."""
    from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]  # (not in typeshed)

    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY")
    return bool(no_proxy) and bool(proxy_bypass_environment(netloc, {"no": no_proxy}))


def _proxy(scheme: str, environ: Mapping[str, str]) -> str | None:
    """The proxy the clients (requests, httpx) take for ``scheme``: ``<scheme>_proxy``, else ``all_proxy``."""
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if environ.get(name):
            return environ[name]
    return None
