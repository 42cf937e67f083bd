"""Who may use a server: anyone on this machine when it listens on loopback, else only holders of its token.

As Jupyter does, the token is random per start and printed once; a request carries
it as `Authorization: Bearer TOKEN`, as `?token=TOKEN` (a browser's first visit, then
a cookie keeps it) or in that cookie.
"""

from __future__ import annotations

import ipaddress
import secrets

COOKIE = "bpwopt_token"


def needs_token(host: str) -> bool:
    """Whether a server bound to host is reachable from other machines (anything but loopback)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name: it may resolve to any interface


def new_token() -> str:
    return secrets.token_urlsafe(24)


def token_matches(offered: list[str], token: str) -> bool:
    """Whether any offered token is the server's, compared in constant time."""
    return any(secrets.compare_digest(t.encode(), token.encode()) for t in offered)
