"""Helpers shared by the tests (importable from every test folder: tests/conftest.py puts tests/ on sys.path)."""
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nothing_listens_on(port: int) -> bool:
    """True when a connection to 127.0.0.1:port is refused (a closed server's port may still sit in
    TIME_WAIT, so binding it is not the test)."""
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0
