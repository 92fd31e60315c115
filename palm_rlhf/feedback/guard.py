"""ASGI middleware: the Host check (400), the request-body size limit (413) and security headers
on every response.

The Host check refuses DNS rebinding: a page on `evil.example` whose name the attacker later
points at 127.0.0.1 reaches this server with `Host: evil.example`, a name the server was not
told to answer to. Accepted: IP addresses (a browser that connects to an address sends it
as the Host, so no foreign origin can), `localhost`, and the names given as `allowed_hosts`.

Written as plain ASGI (not `BaseHTTPMiddleware`) so it can count a body that arrives in
chunks without a Content-Length and stop reading the moment it passes the limit.
"""

from __future__ import annotations

import ipaddress
import json

from starlette.exceptions import HTTPException

# no inline script or style anywhere, so a script tag that slipped through escaping still
# could not run; the page loads only its own /static files
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
     b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # "no-referrer" makes Chrome send Origin: null on form posts
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


class _TooLarge(HTTPException):
    """Raised from `receive` inside a handler: the app's exception layer answers 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes")


def host_name(host: str) -> str:
    """`Host` header -> the name or address without the port, lower-case (`[::1]:80` -> `::1`)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    def __init__(self, app, max_body_bytes: int, allowed_hosts=()):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = {"localhost"} | {host_name(h) for h in allowed_hosts if h}

    def host_allowed(self, host: str) -> bool:
        name = host_name(host)
        return bool(name) and (name in self.allowed_hosts or _is_address(name))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        headers = dict(scope.get("headers", []))
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.host_allowed(host):
            return await _error(send_with_headers, 400, f"this server does not answer to Host {host[:100]!r}; "
                                                        "its operator can add the name with --allowed-host")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _error(send_with_headers, 400, "invalid Content-Length")
            if int(length) > self.max_body_bytes:
                return await _error(send_with_headers, 413, self._too_large())

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _TooLarge(self.max_body_bytes)
            return message

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except _TooLarge:  # only reached if the app let it escape its own handlers
            if not started:
                await _error(send_with_headers, 413, self._too_large())

    def _too_large(self) -> str:
        return f"request body is larger than {self.max_body_bytes} bytes"


async def _error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
