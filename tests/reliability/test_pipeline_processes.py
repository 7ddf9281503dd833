"""No pipeline process outlives its run: SIGINT (what JupyterLab's "interrupt kernel" sends to the kernel,
and only to it) ends the launcher and every worker, and workers exit when their launcher is killed
outright (SIGKILL), on every start method and under torchrun.

Each test starts real processes (seconds each: every worker imports torch), waits until the workers have
reached their process group (the file rendezvous exists), signals, and checks with psutil that no process
of the run is left. Times are generous bounds for a busy 2-core machine, not measurements.
"""
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 120    # until the workers reach their rendezvous (imports on a shared machine)
EXIT_SECONDS = 30        # after the signal, until every process of the run is gone

LAUNCHER = '''
import sys
import torch
from percnb.config import PerceiverConfig
from percnb.pipeline import run_pipeline

if __name__ == "__main__":
    torch.set_num_threads(1)
    config = PerceiverConfig(input_len=16, input_dim=8, latent_len=4, latent_dim=16, output_dim=16,
                             ffw_latent=32, ffw_output=32, num_heads=2, num_layers=2, n_classes=5, seed=0)
    inputs, targets = torch.randn(8, 16, 8), torch.randint(0, 5, (8,))
    try:
        run_pipeline(config, inputs, targets, 2, n_microbatches=2, steps=10 ** 9, start_method=sys.argv[1])
    except KeyboardInterrupt:
        print("KeyboardInterrupt reached the caller", flush=True)
        raise
'''


def _environment(tmp_path: Path) -> dict:
    # TMPDIR: run_pipelines' rendezvous folder lands in tmp_path, where the test can see it appear
    return dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")


def _wait_for_rendezvous(tmp_path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while not glob.glob(str(tmp_path / "**" / "rendezvous*"), recursive=True):
        assert process.poll() is None, f"the launcher ended early: {process.communicate()}"
        assert time.monotonic() < deadline, "the workers did not reach their rendezvous"
        time.sleep(0.2)
    time.sleep(2)                       # a moment into start-up or training: either must end cleanly


def _descendants(pid: int) -> list:
    return psutil.Process(pid).children(recursive=True)


def _assert_all_gone(processes: list) -> None:
    _, alive = psutil.wait_procs(processes, timeout=EXIT_SECONDS)
    survivors = [(p.pid, p.cmdline()[-2:]) for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:                     # leave nothing behind for the next test, whatever the outcome
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not survivors, f"processes outlived the run: {survivors}"


def _launch(tmp_path: Path, start_method: str) -> subprocess.Popen:
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    # A child inherits ignored signals: if anything in this pytest process set SIGINT to SIG_IGN (earlier
    # tests start browsers and servers), the launcher would rightly ignore the interrupt. A kernel that
    # JupyterLab interrupts has the default disposition, so give the launcher that.
    return subprocess.Popen([sys.executable, str(script), start_method], env=_environment(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.timeout(STARTUP_SECONDS + 3 * EXIT_SECONDS + 30)
def test_sigint_ends_the_launcher_and_every_worker(tmp_path):
    launcher = _launch(tmp_path, "spawn")
    _wait_for_rendezvous(tmp_path, launcher)
    workers = _descendants(launcher.pid)
    assert len(workers) >= 2, workers
    launcher.send_signal(signal.SIGINT)          # to the launcher alone, as JupyterLab's interrupt does
    try:
        out, err = launcher.communicate(timeout=EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        launcher.kill()
        out, err = launcher.communicate()
        _assert_all_gone(workers)
        pytest.fail(f"the launcher was still waiting {EXIT_SECONDS} s after SIGINT")
    assert "KeyboardInterrupt reached the caller" in out and launcher.returncode != 0, (out, err[-2000:])
    _assert_all_gone(workers)


@pytest.mark.timeout(STARTUP_SECONDS + 2 * EXIT_SECONDS + 30)
@pytest.mark.parametrize("start_method", ["spawn", "forkserver", "fork"])
def test_workers_exit_when_their_launcher_is_killed(tmp_path, start_method):
    launcher = _launch(tmp_path, start_method)
    _wait_for_rendezvous(tmp_path, launcher)
    workers = _descendants(launcher.pid)          # forkserver: the fork server and its children
    assert len(workers) >= 2, workers
    launcher.kill()                               # SIGKILL: no cleanup code of the launcher runs
    launcher.communicate()
    _assert_all_gone(workers)


@pytest.mark.timeout(STARTUP_SECONDS + 2 * EXIT_SECONDS + 60)
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun is not installed beside this Python")
def test_torchrun_workers_exit_when_torchrun_is_killed(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    agent = subprocess.Popen([torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()),
                              "-m", "percnb.pipeline", "--steps", str(10 ** 9), "--layers", "1", "--batch", "8"],
                             env=_environment(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:                                   # both workers started (in start-up or training: either must end)
        workers = [p for p in _descendants(agent.pid) if "percnb.pipeline" in " ".join(p.cmdline())]
        if len(workers) >= 2:
            break
        assert agent.poll() is None, f"torchrun ended early: {agent.communicate()}"
        assert time.monotonic() < deadline, "torchrun's workers did not start"
        time.sleep(0.5)
    time.sleep(5)
    agent.kill()                                  # workers run in their own session: no signal reaches them
    agent.communicate()
    _assert_all_gone(workers)


def _free_port() -> int:
    from helpers import free_port
    return free_port()
