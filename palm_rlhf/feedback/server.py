"""Run the app under uvicorn on a socket we bind ourselves (so `--port 0` picks a free port
and the caller learns the real address before the first request)."""

from __future__ import annotations

import ipaddress
import logging
import socket

from ..errors import ConfigError

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); ConfigError naming --host/--port when that fails."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0-65535 (0 picks a free port), got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port "
                          "or --host") from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    """http://HOST:PORT of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(app, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve until interrupted (SIGINT/SIGTERM shut down gracefully)."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5,
                            server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
