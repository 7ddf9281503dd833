"""Start JupyterLab on the course's notebooks for any user: `make lab` runs this.

Root (containers, cloud notebook hosts) gets `--allow-root`, nobody else does. The server listens on
127.0.0.1 with a token unless told otherwise (`make lab PORT=9000 IP=0.0.0.0`), never opens a browser
on a machine without a display, and prints the URL to open (and, on a remote machine, the SSH tunnel
that reaches it). A busy port is an error here, not a silent move to the next port (the printed URL
would then be wrong).

    python scripts/lab.py [--port 8888] [--ip 127.0.0.1] [--token TOKEN] [--notebooks DIR]
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"PORT must be a whole number in [1, 65535], got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"PORT must be in [1, 65535], got {port}")
    return port


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"IP must be an address such as 127.0.0.1 or 0.0.0.0, got {text!r}") from None


def _port_is_free(ip: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def has_display() -> bool:
    """Whether a browser could open here: a desktop session on Linux, or macOS/Windows."""
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def lab_command(port: int, ip: str, token: str, notebooks: Path, is_root: bool, open_browser: bool) -> list:
    """The `jupyter lab` command line (a list for `os.execvp`)."""
    command = [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.root_dir={notebooks}",
               f"--ServerApp.ip={ip}", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}"]
    if is_root:
        command.append("--allow-root")
    if not open_browser:
        command.append("--no-browser")
    return command


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="make lab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=_port, default=8888, help="TCP port (make lab PORT=...)")
    parser.add_argument("--ip", type=_ip, default="127.0.0.1",
                        help="interface to listen on (make lab IP=...); 0.0.0.0 exposes it to the network")
    parser.add_argument("--token", default=None, help="login token (default: a new random one; make lab TOKEN=...)")
    parser.add_argument("--notebooks", type=Path, default=ROOT / "notebooks", help="folder to serve")
    args = parser.parse_args(argv)
    token = args.token or secrets.token_hex(24)
    if len(token) < 16:
        parser.error(f"TOKEN must be at least 16 characters (it is the only lock on the server), got {len(token)}")
    if not args.notebooks.is_dir():
        parser.error(f"--notebooks {args.notebooks} is not a folder")
    if not _port_is_free(args.ip, args.port):
        parser.error(f"port {args.port} on {args.ip} is in use (another JupyterLab?); pick another: make lab PORT=8890")
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    host = "127.0.0.1" if args.ip in ("0.0.0.0", "::") else args.ip
    url = f"http://{host}:{args.port}/lab?token={token}"
    lines = ["", "percnb course: JupyterLab is starting on the notebooks in " + str(args.notebooks),
             f"  open  {url}"]
    if host == "127.0.0.1":
        lines.append(f"  on a remote machine, first tunnel from your computer: ssh -N -L {args.port}:127.0.0.1:"
                     f"{args.port} user@that-machine  (then open the URL above locally)")
    if args.ip in ("0.0.0.0", "::"):
        lines.append(f"  listening on every interface ({args.ip}): anyone who can reach port {args.port} and has "
                     "the token can run code here")
    lines.append("  stop with Ctrl+C" + (" (running as root: --allow-root passed)" if is_root else ""))
    print("\n".join(lines) + "\n", flush=True)
    command = lab_command(args.port, args.ip, token, args.notebooks.resolve(), is_root, has_display())
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
