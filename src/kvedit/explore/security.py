"""Only the explorer's own page may change anything: the check every non-read request must pass.

A web page on any other site can make the user's browser send requests to a server on 127.0.0.1 (the Host
check does not stop that: the browser sends `Host: 127.0.0.1`). Such a page cannot read the explorer's
responses (no CORS headers are ever sent), so it cannot learn the per-server token that the explorer writes
into its own page; and the browser names the page's site in the `Origin` header, which the page cannot
forge. So every request with a method other than GET/HEAD/OPTIONS must carry both:

- `Origin`: the explorer's own origin (the ones the server was bound to, or, when those are not known, the
  origin the request's own Host header names); a missing, `null` or foreign Origin is refused;
- `X-Kvedit-Token`: the server's random token (`secrets.token_urlsafe`, new on every start).

Refusals are 403 with a JSON `{"error": message}` and happen before the request reaches any endpoint.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

TOKEN_HEADER = "x-kvedit-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def new_token() -> str:
    """A fresh per-server token."""
    return secrets.token_urlsafe(32)


def loopback_origins(port: int, scheme: str = "http") -> list[str]:
    """The origins of a page served on loopback port `port`."""
    return [f"{scheme}://{host}:{port}" for host in ("127.0.0.1", "localhost", "[::1]")]


class PageOnly:
    """ASGI middleware: refuse (403) every state-changing request that does not come from the explorer's page.

    `origins`: the accepted `Origin` values (e.g. `loopback_origins(port)`); None accepts the origin that the
    request's Host header names (same-origin), for servers whose address is not known in advance.
    """

    def __init__(self, app: ASGIApp, token: str, origins: Collection[str] | None = None) -> None:
        if not token:
            raise ValueError("the explorer's token is empty")
        self.app = app
        self.token = token
        self.origins = None if origins is None else {o.rstrip("/").lower() for o in origins}

    def problem(self, scope: Scope) -> str | None:
        """Why the request is refused, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        if not origin or origin == "null":
            return (
                "this request has no Origin header: the explorer changes the model only for requests from its "
                "own page (open the page, or send Origin and X-Kvedit-Token as the page does)"
            )
        allowed = self.origins
        if allowed is None:
            allowed = {f"{scope.get('scheme', 'http')}://{headers.get('host', '')}".lower()}
        if origin.rstrip("/").lower() not in allowed:
            return f"requests from {origin} are refused: the explorer accepts changes only from its own page"
        given = headers.get(TOKEN_HEADER, "")
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            return (
                f"{'a wrong' if given else 'no'} X-Kvedit-Token header: reload the explorer's page (the token "
                "changes whenever the server restarts)"
            )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            problem = self.problem(scope)
            if problem is not None:
                await JSONResponse({"error": problem}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
