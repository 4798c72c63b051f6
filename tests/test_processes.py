"""ServerProcess with real processes: start, readiness, stop leaving nothing behind, secrets deleted; the exit
registry (newest first, stop_now preferred) and the kit's SIGTERM handler, chained to the one it replaced."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from deploylab import config
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


# a process that starts a server (a child sleeping in its own process group), says so, then waits to be signalled
SIGNALLED = r"""
import signal, sys, time
from deploylab.serving.processes import ServerProcess
if sys.argv[1] == "own handler":
    def own(signum, frame):
        print("own handler ran", flush=True)
        sys.exit(7)
    signal.signal(signal.SIGTERM, own)
elif sys.argv[1] == "ignored":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
server = ServerProcess("sleeper", sys.argv[2])
server.launch([sys.executable, "-c", "import time; time.sleep(600)"], cwd=".", env={})
print("server", server.proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("before, exit_code", [("default", -signal.SIGTERM), ("own handler", 7), ("ignored", None)])
def test_sigterm_stops_the_registered_servers_then_does_what_it_did_before(tmp_path, before, exit_code):
    """SIGTERM to a process that started a server: the kit's handler stops the server (in its own process
    group, it would outlive the process), then the disposition the process had runs as before."""
    proc = subprocess.Popen([sys.executable, "-c", SIGNALLED, before, str(tmp_path / "sleeper.log")], cwd=config.ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("server "), line
        server = psutil.Process(int(line.split()[1]))
        proc.send_signal(signal.SIGTERM)
        if exit_code is None:  # a process that ignores SIGTERM keeps ignoring it, and its server keeps running
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
            assert server.is_running()
            return
        assert proc.wait(timeout=30) == exit_code
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, "the server outlived the SIGTERM"
        if before == "own handler":
            assert "own handler ran" in proc.stdout.read()
    finally:
        for p in [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        proc.wait(timeout=10)


class _Recorder:
    def __init__(self, name, log, quick=False):
        self.name, self.log = name, log
        if quick:
            self.stop_now = lambda: log.append(f"{name} now")

    def stop(self):
        self.log.append(self.name)


def test_the_exit_registry_stops_the_newest_first_and_prefers_stop_now():
    log = []
    node, cluster, server = _Recorder("node", log), _Recorder("cluster", log, quick=True), _Recorder("server", log)
    for s in (node, cluster, server):
        processes.stop_at_exit(s)
    processes.forget_at_exit(node)
    processes.stop_at_exit(node)  # registered again: now the newest
    processes._stop_all()
    assert log == ["node", "server", "cluster now"]
    assert not any(s in processes._RUNNING for s in (node, cluster, server))


# a process that starts a server which must die with it, says so, then waits to be killed
ORPHANED = r"""
import sys, time
from deploylab.serving.processes import ServerProcess
server = ServerProcess("sleeper", sys.argv[1])
server.launch([sys.executable, "-c", "import time; time.sleep(600)"], cwd=".", env={}, die_with_parent=True)
print("server", server.proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_server_launched_to_die_with_its_parent_does_when_the_parent_is_killed(tmp_path):
    """SIGKILL runs no handler: a server in its own session would outlive its parent, unless it asked the
    kernel for SIGTERM when the parent dies (what a Ray node does for its driver)."""
    proc = subprocess.Popen([sys.executable, "-c", ORPHANED, str(tmp_path / "sleeper.log")], cwd=config.ROOT,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("server "), line
    server = psutil.Process(int(line.split()[1]))
    assert "time.sleep(600)" in " ".join(server.cmdline()), "the launcher exec'd into the command, keeping its pid"
    proc.kill()
    proc.wait(timeout=10)
    try:
        server.wait(timeout=10)
    except psutil.TimeoutExpired:
        server.kill()
        pytest.fail("the server outlived its parent's SIGKILL")
