"""Replacing the served version under load (lesson 10): with a drain, and without one.

- :func:`swap_with_drain` -- the router sends new requests to the new version at once, the old one
  finishes what it already has (*draining*), and only when nothing is in flight there is it
  stopped. No request is cut: the old server never refuses a connection while it is still routed to.
- :func:`naive_swap` -- stop the old server, then point the router at the new one: what a
  restart-in-place does. Requests that reach the old server while it stops find no listener, or a
  connection it is closing: the router answers them 502.
- :func:`during` -- run one of them in a thread at a given moment of a load run, so the load
  generator (on the main thread) measures what clients saw.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .router import spec


def swap_with_drain(router: Any, new: Any, version: str, old: Any, *, timeout_s: float = 30.0) -> dict[str, float]:
    """Route to ``new`` (labelled ``version``), wait until ``old`` has nothing in flight, then stop it."""
    t0 = time.perf_counter()
    state = router.configure(stable=spec(new, version))
    while state["draining"]:
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"the old version still had requests in flight after {timeout_s} s: {state['draining']}")
        time.sleep(0.01)
        state = router.state()
    drained = time.perf_counter() - t0
    old.stop()
    return {"drained_s": drained, "stopped_s": time.perf_counter() - t0}


def naive_swap(router: Any, new: Any, version: str, old: Any) -> dict[str, float]:
    """Stop ``old`` first, then route to ``new``: the window in between is what clients pay for."""
    t0 = time.perf_counter()
    old.stop()
    stopped = time.perf_counter() - t0
    router.configure(stable=spec(new, version))
    return {"stopped_s": stopped, "rerouted_s": time.perf_counter() - t0}


class During:
    """``action()`` run in a thread after ``after_s`` seconds; :meth:`join` returns its result or re-raises."""

    def __init__(self, action: Callable[[], Any], after_s: float):
        self.result: Any = None
        self.error: BaseException | None = None

        def target() -> None:
            time.sleep(after_s)
            try:
                self.result = action()
            except BaseException as e:  # re-raised by join()
                self.error = e

        self.thread = threading.Thread(target=target, name="swap", daemon=True)
        self.thread.start()

    def join(self, timeout_s: float = 60.0) -> Any:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"the swap did not finish in {timeout_s} s")
        if self.error is not None:
            raise self.error
        return self.result


def during(action: Callable[[], Any], after_s: float) -> During:
    """Start ``action`` ``after_s`` seconds from now in a thread (call before the load run)."""
    return During(action, after_s)
