"""Fixtures for the feedback tests (helpers live in feedback_testing.py)."""

from __future__ import annotations

import subprocess

import pytest
from feedback_testing import Server, start_server


@pytest.fixture
def server_factory():
    """start_server(...) with every started server stopped at teardown."""
    started: list[Server] = []

    def factory(*args, **kwargs) -> Server:
        server = start_server(*args, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(timeout=15)
