"""`make lab`, the README's first command, started the way a user starts it: does it serve the course?"""
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port, nothing_listens_on

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import lab  # noqa: E402  (scripts/lab.py, what `make lab` runs)

START_TIMEOUT = 90     # seconds for JupyterLab to answer (it imports a lot on a busy 2-core machine)
STOP_TIMEOUT = 15


def _stop(process: subprocess.Popen) -> None:
    """End make and everything it started (its own session), SIGTERM then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _get(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_make_lab_serves_the_notebooks_and_stops():
    port, token = free_port(), secrets.token_hex(16)
    process = subprocess.Popen(["make", "--no-print-directory", "lab", f"PORT={port}", f"TOKEN={token}"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        deadline, listing, last_error = time.monotonic() + START_TIMEOUT, None, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                listing = _get(f"http://127.0.0.1:{port}/api/contents", token)
                break
            except (urllib.error.URLError, ConnectionError, OSError) as error:
                last_error = error
                time.sleep(0.5)
        if listing is None:
            _stop(process)
            output = process.stdout.read()
            pytest.fail(f"make lab did not answer on port {port} within {START_TIMEOUT} s "
                        f"(exit code {process.returncode}, last error {last_error}); its output:\n{output}")
        served = sorted(item["name"] for item in listing["content"] if item["type"] == "notebook")
        expected = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
        assert served == expected
        # A notebook opens through the API too (what the browser does when you click it).
        first = _get(f"http://127.0.0.1:{port}/api/contents/{expected[0]}", token)
        assert first["type"] == "notebook" and first["content"]["cells"]
        # Without the token the server refuses.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=5)
        assert refused.value.code == 403
    finally:
        _stop(process)
    output = process.stdout.read()
    assert f"http://127.0.0.1:{port}/lab?token={token}" in output, output
    assert "ssh -N -L" in output, output
    assert nothing_listens_on(port), f"port {port} still answers after make lab was stopped"


def test_make_lab_refuses_a_bad_port_before_starting():
    result = subprocess.run(["make", "--no-print-directory", "lab", "PORT=0"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "PORT must be in [1, 65535], got 0" in result.stderr


def test_allow_root_only_for_root_and_no_browser_without_display(tmp_path):
    as_root = lab.lab_command(8888, "127.0.0.1", "t" * 16, tmp_path, is_root=True, open_browser=False)
    as_user = lab.lab_command(8888, "127.0.0.1", "t" * 16, tmp_path, is_root=False, open_browser=True)
    assert "--allow-root" in as_root and "--no-browser" in as_root
    assert "--allow-root" not in as_user and "--no-browser" not in as_user
    assert "--ServerApp.port_retries=0" in as_user and "--ServerApp.ip=127.0.0.1" in as_user


def test_has_display_follows_the_environment(monkeypatch):
    monkeypatch.setattr(lab.sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not lab.has_display()
    monkeypatch.setenv("DISPLAY", ":0")
    assert lab.has_display()
