"""Server processes: start one in its own process group, wait for it, stop it leaving nothing behind.

Every server the course starts from Python (TorchServe, the ASGI server, the scale-out servers)
runs through :class:`ServerProcess`:

- :meth:`ServerProcess.launch` -- ``Popen`` in a new session (process group), output to a log file,
  and an entry in the exit registry, so a notebook kernel that exits or restarts takes its
  servers down (:func:`stop_at_exit`, run by ``atexit``);
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


# Every server started from this process: anything with stop().
_RUNNING: "weakref.WeakSet[Any]" = weakref.WeakSet()


def stop_at_exit(server: Any) -> None:
    """Stop ``server`` (its ``stop()``) when the interpreter exits, unless :func:`forget_at_exit` came first."""
    _RUNNING.add(server)


def forget_at_exit(server: Any) -> None:
    """``server`` was stopped: nothing left to do for it at exit."""
    _RUNNING.discard(server)


@atexit.register
def _stop_all() -> None:  # a notebook kernel that exits (or restarts) takes its servers down
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.stop()


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

    def launch(self, cmd: Sequence[str], *, cwd: str | os.PathLike, env: dict[str, str]) -> None:
        """Start ``cmd`` in a new session, output to the log file; it is stopped at interpreter exit."""
        if self.proc is not None:
            raise ServeError(f"this {self.name} is already started")
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
