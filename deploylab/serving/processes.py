"""Server processes: start one in its own process group, wait for it, stop it leaving nothing behind.

Every server the course starts from Python (TorchServe, the ASGI server, the scale-out servers)
runs through :class:`ServerProcess`:

- :meth:`ServerProcess.launch` -- ``Popen`` in a new session (process group), output to a log file,
  and an entry in the exit registry, so a notebook kernel that exits, restarts or receives SIGTERM
  takes its servers down (:func:`stop_at_exit`: run by ``atexit`` and by the kit's SIGTERM handler,
  which then calls the handler it replaced);
- :meth:`ServerProcess.wait_until` -- poll a readiness check, failing early (with the log's tail)
  when the process exits during start-up;
- :meth:`ServerProcess.stop` -- SIGTERM to the group, SIGKILL to whatever is left, the secrets it
  wrote (key files) deleted; raises if any process survives.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil


class ServeError(RuntimeError):
    """A server could not be set up, started, reached or stopped as expected."""


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free on ``host`` a moment ago (the OS picks them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Something listens on ``host:port`` already (a TCP connect succeeds): a server would fail to bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class _Registry:
    """The servers started from this process, oldest first, held weakly (a server nobody holds is not kept alive)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, server: Any) -> None:
        key = id(server)
        self._refs.pop(key, None)  # registered again: now the newest
        self._refs[key] = weakref.ref(server, lambda ref, key=key: self._refs.get(key) is ref and self._refs.pop(key))

    def discard(self, server: Any) -> None:
        if server in self:
            del self._refs[id(server)]

    def __contains__(self, server: Any) -> bool:
        ref = self._refs.get(id(server))
        return ref is not None and ref() is server

    def newest_first(self) -> list[Any]:
        return [s for s in (ref() for ref in reversed(list(self._refs.values()))) if s is not None]


# Every server started from this process: anything with stop(), and optionally stop_now() (see _stop_all).
_RUNNING = _Registry()
_stopping = False  # _stop_all is running: a SIGTERM meanwhile must not cut it short
_chained_sigterm: Any = signal.SIG_DFL  # the SIGTERM handler the kit's replaced, called after the servers are stopped


def stop_at_exit(server: Any) -> None:
    """Stop ``server`` when the interpreter exits or receives SIGTERM, unless :func:`forget_at_exit` came first."""
    _RUNNING.add(server)
    stop_on_sigterm()


def forget_at_exit(server: Any) -> None:
    """``server`` was stopped: nothing left to do for it at exit."""
    _RUNNING.discard(server)


@atexit.register
def _stop_all() -> None:
    """Stop every registered server, newest first (a cluster before the nodes it was built on).

    What a notebook kernel runs when it exits, restarts or receives SIGTERM. A server's ``stop_now()``
    is preferred to its ``stop()`` where it has one: Jupyter sends SIGTERM to a kernel that is still
    alive 2.5 s after its shutdown request and SIGKILL 2.5 s later, so the exit path must be quick.
    """
    global _stopping
    if _stopping:
        return
    _stopping = True
    try:
        for server in _RUNNING.newest_first():
            if server in _RUNNING:  # not already stopped by one stopped before it
                with contextlib.suppress(Exception):
                    getattr(server, "stop_now", server.stop)()
                _RUNNING.discard(server)
    finally:
        _stopping = False


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM: stop every registered server, then do what the handler we replaced would have done."""
    if _stopping:  # already stopping them (the kernel is exiting): let that finish
        return
    _stop_all()
    if callable(_chained_sigterm):  # e.g. Ray's driver handler (sys.exit) or a CLI's own
        _chained_sigterm(signum, frame)
    elif _chained_sigterm != signal.SIG_IGN:  # the default: die of SIGTERM, as without the kit
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def stop_on_sigterm() -> bool:
    """Make SIGTERM stop the registered servers first; the handler found is called afterwards.

    Without it, SIGTERM kills the process (the default) or runs another library's handler, and the
    servers, each in its own process group, outlive it. Ray's ``ray.init`` installs its own handler:
    call this again after it (:class:`~deploylab.serving.ray_cluster.RayCluster` does). Only the main
    thread can set a handler, and a process that ignores SIGTERM keeps ignoring it; returns whether
    the kit's handler is in place.
    """
    global _chained_sigterm
    if threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_sigterm:
        return True
    if current == signal.SIG_IGN:
        return False
    _chained_sigterm = signal.SIG_DFL if current is None else current
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def rss_bytes(processes: Iterable[psutil.Process]) -> int:
    """Resident memory of a set of processes, summed: what a server holds in RAM now."""
    total = 0
    for p in processes:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def cpu_seconds(processes: Iterable[psutil.Process]) -> float:
    """User + system CPU time a set of processes has used so far (those that exited are not counted)."""
    total = 0.0
    for p in processes:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


# Run before the server's command (then exec'd into it, same pid): ask the kernel for SIGTERM when the parent
# dies (Linux's PR_SET_PDEATHSIG, kept across exec), and give up if the parent is already gone.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
                    "os.getppid() == int(sys.argv[1]) or sys.exit('the parent exited before the server started'); "
                    "os.execvp(sys.argv[2], sys.argv[2:])")


class ServerProcess:
    """One server command in its own process group, with its log file and the secrets it writes.

    ``secrets`` are files the server writes that must not outlive it (its key file): :meth:`stop`
    deletes them. The processes seen in the group are remembered (as ``psutil.Process``, which
    notices a recycled pid), so that a child that left the group is still found and stopped.
    """

    def __init__(self, name: str, log_file: str | os.PathLike, *, secrets: Sequence[str | os.PathLike] = ()):
        self.name = name
        self.log_file = Path(log_file)
        self.secrets = [Path(s) for s in secrets]
        self.proc: subprocess.Popen | None = None
        self._seen: dict[int, psutil.Process] = {}
        self._log: Any = None

    def launch(self, cmd: Sequence[str], *, cwd: str | os.PathLike, env: dict[str, str], die_with_parent: bool = False) -> None:
        """Start ``cmd`` in a new session, output to the log file; it is stopped at interpreter exit.

        ``die_with_parent`` (Linux): the command gets SIGTERM when this process dies, even by SIGKILL, which
        no exit handler survives (Jupyter kills a kernel that takes over 5 s to shut down; nbval kills its
        kernel at once). Only for a command that stops everything it started on SIGTERM (``ray start --block``).
        """
        if self.proc is not None:
            raise ServeError(f"this {self.name} is already started")
        if die_with_parent and sys.platform == "linux":
            cmd = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "wb")
        self.proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        stop_at_exit(self)

    def alive(self) -> bool:
        """The launched command is still running."""
        return self.proc is not None and self.proc.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, *, poll_s: float = 0.1) -> None:
        """Call ``ready()`` until it returns True; raise (with the log's tail) if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = None if self.proc is None else self.proc.returncode
                raise ServeError(f"{self.name} exited during start-up ({code}); see {self.log_file}:\n{self.tail()}")
            if ready():
                self.remember()
                return
            time.sleep(poll_s)
        raise ServeError(f"{self.name} did not become ready in {timeout_s:.0f} s; see {self.log_file}:\n{self.tail()}")

    def remember(self) -> None:
        """Note every process now in the tree under the launched one."""
        if self.proc is None:
            return
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
            for p in (root, *root.children(recursive=True)):
                self._seen.setdefault(p.pid, p)

    def processes(self) -> list[psutil.Process]:
        """Live processes of this server: the launched one and every child seen so far."""
        self.remember()
        alive = []
        for p in self._seen.values():
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        return sorted(alive, key=lambda p: p.pid)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout_s``; deletes the secrets; raises if a process survives."""
        if self.proc is None:
            return
        self.remember()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.processes():
            time.sleep(0.2)
        for p in self.processes():  # anything that ignored SIGTERM (or left the group)
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        psutil.wait_procs(self.processes(), timeout=10)
        self._log.close()
        survivors = self.processes()
        self.proc = None
        forget_at_exit(self)
        for secret in self.secrets:  # the tokens die with the server
            secret.unlink(missing_ok=True)
        if survivors:
            raise ServeError(f"processes of {self.name} survived stop(): {[p.pid for p in survivors]}")

    def tail(self, lines: int = 30, path: str | os.PathLike | None = None) -> str:
        """The last lines of the log file (or of another log of the server's, ``path``)."""
        path = Path(path) if path else self.log_file
        if not path.is_file():
            return "(no log yet)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
