"""A Ray cluster on this machine, each node its own process group, and finding what any of it left running.

- :class:`RayCluster` -- ``ray start --head`` (and ``ray start --address`` for a second node) as
  separate processes, each in its own process group via :class:`~deploylab.serving.processes.ServerProcess`,
  with a private temp dir, usage statistics and the dashboard off; this process joins as the driver.
  The cluster is in the kit's exit registry: a kernel that exits, or receives SIGTERM, stops it
  (Ray's driver installs its own SIGTERM handler in ``ray.init``; the kit's runs first, then Ray's);
  and a driver killed outright takes its nodes along (they get SIGTERM when it dies);
- :func:`ray_processes` -- the live processes of a cluster, found by its private temp dir.

:mod:`~deploylab.serving.ray_serve` runs Serve and the course's application on it (lesson 08).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import ray

from .. import config
from . import processes
from .processes import ServeError, ServerProcess, free_ports, port_in_use

# What every Ray process of the course gets: no usage statistics sent anywhere, one thread per
# replica's ONNX Runtime, autoscaling metrics pushed every 0.5 s (the default, 10 s, is too slow to see
# scaling in a lesson), and no drain on SIGTERM: Ray 2.60's `ray start --block` otherwise waits up to 30 s
# for Serve's proxies to move traffic to other nodes before it stops its processes -- on one machine,
# with the whole cluster going, there is nowhere to move it.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
EXIT_TIMEOUT_S = 0.5  # at exit or on SIGTERM: a kernel being shut down is killed ~2.5 s after its SIGTERM


def quiet_driver(quiet: bool = True) -> None:
    """Keep Ray's messages out of the driver's output (a notebook's cells), or let them through again.

    ``ray.init(log_to_driver=False)`` stops the workers' stdout and stderr, but not the error listener every
    driver runs: it prints the raylet's messages (a worker that died, a task retried while Serve shuts
    down) with ANSI colour codes, whatever ``log_to_driver`` says. The lesson reports what happened in
    its own words (a killed replica, its replacement), and each node's log under the cluster's temp dir
    keeps Ray's. Ray's own debugger (``ray.util.rpdb``) switches the driver's printing off the same way.
    """
    os.environ["RAY_COLOR_PREFIX"] = "0"  # if anything is printed after all: no colour codes
    ray._private.worker._worker_logs_enabled = not quiet


def _ray_command() -> str:
    ray_bin = Path(sys.executable).with_name("ray")
    return str(ray_bin) if ray_bin.exists() else shutil.which("ray") or "ray"


def ray_processes(temp_dir: str | os.PathLike) -> list[psutil.Process]:
    """Live processes whose command line names ``temp_dir``: what a cluster started there left running.

    Ray's own ``ray stop`` kills by process name machine-wide; matching the private temp dir finds
    this cluster's processes only (raylet, GCS, workers, agents).
    """
    mark, found = str(temp_dir), []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(mark in part for part in p.info["cmdline"] or ()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


class RayCluster:
    """A Ray cluster of ``nodes`` nodes on this machine: each node ``ray start --block`` in its own process group.

    ``cpus`` (default: the machine's cores) is split evenly over the nodes, so that two nodes on a
    2-core machine are two 1-CPU nodes. The driver (this process) joins with ``ray.init(address=...)``.
    """

    def __init__(self, nodes: int = 1, cpus: int | None = None, *, start_timeout_s: float = 120.0):
        if nodes < 1:
            raise ValueError(f"need at least one node, got {nodes}")
        self.nodes, self.cpus = nodes, cpus or os.cpu_count() or 1
        if self.cpus < nodes:
            raise ValueError(f"{nodes} nodes need at least {nodes} CPUs, got {self.cpus}")
        self.start_timeout_s = start_timeout_s
        self.temp_dir: Path | None = None  # short, under /tmp: Ray's socket paths must fit in 107 bytes
        self.port: int | None = None
        self.node_processes: list[ServerProcess] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _node_command(self, head: bool, cpus: int) -> list[str]:
        cmd = [_ray_command(), "start", "--block", f"--num-cpus={cpus}", "--num-gpus=0", "--node-ip-address=127.0.0.1",
               "--disable-usage-stats"]
        if head:
            return cmd + ["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
                          "--dashboard-host=127.0.0.1", "--ray-client-server-port", str(free_ports(1)[0])]
        # a second node on the same host needs its own dashboard-agent port (the default, 52365, is the head's)
        agent, metrics = free_ports(2)
        return cmd + [f"--address={self.address}", f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}"]

    def start(self) -> "RayCluster":
        """Start the head, then the other nodes; join as the driver; wait until every node is alive."""
        if ray.is_initialized():
            raise ServeError("this process is already connected to a Ray cluster: stop it first (ray.shutdown())")
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-dl-", dir="/tmp"))
        self.port = free_ports(1)[0]
        env = {**os.environ, **RAY_ENV}
        share = [self.cpus // self.nodes] * self.nodes
        share[0] += self.cpus - sum(share)
        try:
            for i, cpus in enumerate(share):
                node = ServerProcess(f"Ray node {i} ({'head' if i == 0 else 'worker'})", self.temp_dir / f"node{i}.log")
                self.node_processes.append(node)
                # die_with_parent: a driver killed with SIGKILL (a kernel Jupyter gave up on) still takes its nodes along
                node.launch(self._node_command(i == 0, cpus), cwd=config.ROOT, env=env, die_with_parent=True)
                if i == 0:
                    node.wait_until(lambda: port_in_use(self.port), self.start_timeout_s, poll_s=0.2)
            ray.init(address=self.address, log_to_driver=False, logging_level="WARNING", configure_logging=True)
            quiet_driver()
            processes.stop_on_sigterm()  # ray.init replaced the kit's SIGTERM handler with its own: the kit's first again
            self.node_processes[0].wait_until(lambda: len(self.alive_nodes()) >= self.nodes, self.start_timeout_s, poll_s=0.2)
        except BaseException:
            self.stop()
            raise
        for node in self.node_processes:
            node.remember()
        processes.stop_at_exit(self)  # newer than its nodes: stopped first, driver disconnected first
        return self

    def alive_nodes(self) -> list[dict[str, Any]]:
        """``ray.nodes()`` that are alive: id, address and CPUs of each."""
        return [{"node_id": n["NodeID"], "address": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU", 0.0),
                 "head": "node:__internal_head__" in n["Resources"]}
                for n in ray.nodes() if n["Alive"]]

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster (found by its temp dir, and the nodes' process trees)."""
        seen = {p.pid: p for node in self.node_processes for p in node.processes()}
        if self.temp_dir is not None:
            seen.update({p.pid: p for p in ray_processes(self.temp_dir)})
        return sorted(seen.values(), key=lambda p: p.pid)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Disconnect the driver, stop worker nodes then the head; raises if any of the cluster's processes survives.

        Serve's state is already gone (``serve.shutdown``) and a node holds nothing worth saving, so
        whatever has not exited ``timeout_s`` after SIGTERM is killed.
        """
        with contextlib.suppress(Exception):
            ray.shutdown()
        quiet_driver(False)
        leftovers = []
        for node in reversed(self.node_processes):
            try:
                node.stop(timeout_s)
            except ServeError as e:
                leftovers.append(str(e))
        if self.temp_dir is not None:
            stragglers = ray_processes(self.temp_dir)
            for p in stragglers:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(stragglers, timeout=10)
            if ray_processes(self.temp_dir):
                leftovers.append(f"processes under {self.temp_dir} survived: {[p.pid for p in ray_processes(self.temp_dir)]}")
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.node_processes = []
        processes.forget_at_exit(self)
        if leftovers:
            raise ServeError("; ".join(leftovers))

    def stop_now(self) -> None:
        """The exit path (interpreter exit, SIGTERM): :meth:`stop` with a short grace before SIGKILL."""
        self.stop(EXIT_TIMEOUT_S)


