"""ServerProcess with real processes: start, readiness, stop leaving nothing behind, secrets deleted."""

from __future__ import annotations

import sys
import time

import psutil
import pytest

from deploylab.serving import processes
from deploylab.serving.processes import ServeError, ServerProcess

# a parent that starts a child ignoring SIGTERM, says so, then waits forever
STUBBORN = r"""
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print('child up', flush=True); time.sleep(600)"])
print("parent up", child.pid, flush=True)
time.sleep(600)
"""


def _launch(tmp_path, code: str, **kwargs) -> ServerProcess:
    secret = tmp_path / "key_file.json"
    secret.write_text("{}")
    proc = ServerProcess("test server", tmp_path / "server.log", secrets=[secret], **kwargs)
    proc.launch([sys.executable, "-c", code], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    return proc


def test_stop_kills_the_whole_tree_even_a_child_that_ignores_sigterm(tmp_path):
    proc = _launch(tmp_path, STUBBORN)
    proc.wait_until(lambda: "child up" in proc.tail(), timeout_s=30)
    seen = proc.processes()
    assert len(seen) == 2, [p.cmdline() for p in seen]
    proc.stop(timeout_s=2)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in seen)
    assert not (tmp_path / "key_file.json").exists(), "the key file must die with the server"
    assert proc.proc is None and proc.processes() == []


def test_a_process_that_exits_during_start_up_is_reported_with_its_log(tmp_path):
    proc = _launch(tmp_path, "import sys; print('cannot bind the port', flush=True); sys.exit(3)")
    with pytest.raises(ServeError, match=r"exited during start-up \(3\)[\s\S]*cannot bind the port"):
        proc.wait_until(lambda: False, timeout_s=30)
    proc.stop()


def test_a_server_that_never_gets_ready_times_out(tmp_path):
    proc = _launch(tmp_path, "import time; time.sleep(600)")
    t0 = time.monotonic()
    with pytest.raises(ServeError, match="did not become ready in 1 s"):
        proc.wait_until(lambda: False, timeout_s=1.0)
    assert time.monotonic() - t0 < 10
    proc.stop(timeout_s=5)


def test_launching_twice_is_refused_and_stop_is_idempotent(tmp_path):
    proc = _launch(tmp_path, "import time; time.sleep(600)")
    with pytest.raises(ServeError, match="already started"):
        proc.launch([sys.executable, "-c", "pass"], cwd=tmp_path, env={})
    proc.stop(timeout_s=5)
    proc.stop()  # nothing left to do


def test_the_exit_registry_stops_what_was_not_stopped(tmp_path):
    proc = _launch(tmp_path, "import time; time.sleep(600)")
    pid = proc.proc.pid
    assert proc in processes._RUNNING
    processes._stop_all()  # what atexit runs when a notebook kernel exits
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert proc not in processes._RUNNING
