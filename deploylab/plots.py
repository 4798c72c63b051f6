"""The course's plots (matplotlib): sample images, accuracy against latency (with its Pareto front),
and the deployment strategies of lesson 07."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .data import CLASS_NAMES
from .decision import pareto_front, pareto_rows


def image_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 8) -> Figure:
    """A grid of real images: one row per class, the first ``per_class`` images of each."""
    fig, axes = plt.subplots(len(CLASS_NAMES), per_class, figsize=(per_class * 0.9, len(CLASS_NAMES) * 0.95))
    for label, name in enumerate(CLASS_NAMES):
        idx = np.flatnonzero(labels == label)[:per_class]
        for k, ax in enumerate(axes[label]):
            ax.axis("off")
            if k < len(idx):
                ax.imshow(images[idx[k]], cmap="gray", vmin=0, vmax=255)
        axes[label][0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    return fig


MARKERS = "osD^vPX*h<>p"  # a new marker for each group of ten points (the colour cycle has ten colours)


def accuracy_vs_latency(records: list[dict[str, Any]], batch_size: int = 1, title: str | None = None,
                        mark_pareto: bool = False) -> Figure:
    """Scatter of accuracy (%) against p50 latency (ms, log scale) at ``batch_size``, one point per record.

    Each point carries a number, and the legend beside the plot names it (variant and runtime): a
    dozen variants, several at the same accuracy, made inline labels overlap into an unreadable block.
    ``mark_pareto`` rings the Pareto-optimal records (none faster and at least as accurate) and joins them.
    """
    fig, ax = plt.subplots(figsize=(10, 4.4), layout="constrained")
    b = str(batch_size)
    points, handles, names = [], [], []
    for r in records:
        lat = r["latency_ms"].get(b, {}).get("p50_ms")
        if lat is None or r.get("accuracy") is None:
            continue
        k = len(points)
        points.append((lat, 100 * r["accuracy"]))
        handles.append(ax.scatter(lat, 100 * r["accuracy"], s=40, color=f"C{k % 10}", marker=MARKERS[k // 10 % len(MARKERS)]))
        runtime = "" if r["runtime"] in r["variant"] else f" ({r['runtime']})"  # "x (onnxruntime)" names it already
        names.append(f"{k + 1}  {r['variant']}{runtime}")
    if mark_pareto and points:
        _mark_front(ax, points)
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency at batch {batch_size} (ms, log scale)")
    ax.set_ylabel("test accuracy (%)")
    profile = records[0]["profile"] if records else "?"
    cpu = records[0]["hardware"]["cpu"] if records else "?"
    ax.set_title(title or f"accuracy vs latency -- profile {profile}, {cpu}", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    if handles:
        fig.legend(handles, names, loc="outside right upper", fontsize=7, frameon=False, handletextpad=0.3)
    _plain_log_ticks(ax, "x")
    _number_points(fig, ax, points)
    return fig


def _plain_log_ticks(ax: Any, which: str = "x") -> None:
    """Label a log axis at 1, 2 and 5 x 10^k as plain numbers ("0.5", "2", "20"), minor ticks unlabelled.

    Matplotlib's default labels every minor tick of a short log range in scientific notation
    ("2x10^0", "3x10^0", ...), and those labels overlap. Where fewer than two of 1-2-5 fall inside
    the range, every integer multiple gets a label instead; over more than four decades, powers of ten only.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    subs = (1.0, 2.0, 5.0)
    inside = [m * 10.0**e for e in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1) for m in subs]
    if sum(lo <= v <= hi for v in inside) < 2:
        subs = tuple(float(m) for m in range(1, 10))
    elif np.log10(hi / lo) > 4:  # over four decades 1-2-5 labels would crowd: powers of ten only
        subs = (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(float(m) for m in range(1, 10))))
    axis.set_minor_formatter(NullFormatter())


def _number_points(fig: Figure, ax: Any, points: list[tuple[float, float]], colours: list[str] | None = None) -> None:
    """Write each point's number (1, 2, ...) beside it, moved around the point until it overlaps no other number.

    Positions are worked out in pixels after the layout is drawn, so a number never sits on a
    number already placed; with many points at one spot some numbers move further out.
    """
    fig.canvas.draw()  # lays out the figure (constrained layout, legend), so the data-to-pixel transform is final
    offsets = [(4, 3), (4, -11), (-12, 3), (-12, -11), (4, 12), (-12, 12), (4, -20), (-12, -20), (14, -4), (-22, -4)]
    scale = fig.dpi / 72  # points to pixels
    pixels = [ax.transData.transform(p) for p in points]
    r = 4 * scale  # a marker's half width: numbers avoid every marker too
    placed: list[tuple[float, float, float, float]] = [(px - r, py - r, px + r, py + r) for px, py in pixels]
    for k, ((x, y), (px, py)) in enumerate(zip(points, pixels)):
        text = str(k + 1)
        w, h = 6.0 * len(text) * scale, 9.0 * scale
        for dx, dy in offsets:
            box = (px + dx * scale, py + dy * scale, px + dx * scale + w, py + dy * scale + h)
            if not any(box[0] < q[2] and q[0] < box[2] and box[1] < q[3] and q[1] < box[3] for q in placed):
                break
        placed.append(box)
        colour = colours[k] if colours else f"C{k % 10}"  # the point's own colour, so number and point pair up
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7, color=colour,
                    fontweight="bold")


def _mark_front(ax: Any, points: list[tuple[float, float]]) -> None:
    """Ring the Pareto-optimal (latency, accuracy) points and join them with a step line."""
    front = sorted(p for p, on in zip(points, pareto_front(points)) if on)
    ax.scatter([p[0] for p in front], [p[1] for p in front], s=160, facecolors="none", edgecolors="black",
               linewidths=1.2, label="Pareto front", zorder=3)
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=0.8, ls="--", zorder=2)
    ax.legend(fontsize=8, loc="lower right")


def pareto(rows: list[Any], batch_size: int = 1, title: str | None = None) -> Figure:
    """Accuracy (%) against p50 latency at ``batch_size`` for decision rows (:mod:`deploylab.decision`),
    coloured by kind, the Pareto front ringed and joined.

    Numbered like :func:`accuracy_vs_latency`: each point carries a number and the legend beside the plot
    names it (front members marked), because two dozen variants at nearly one accuracy made inline
    names overlap into an unreadable block.
    """
    fig, ax = plt.subplots(figsize=(10, 4.8), layout="constrained")
    colours = {"pytorch": "tab:blue", "onnxruntime": "tab:green", "executorch": "tab:purple", "openvino": "tab:cyan",
               "aotinductor": "tab:olive", "served": "tab:red"}  # every kind of decision.Row
    pairs = pareto_rows(rows, batch_size)
    points = [(r.latency(batch_size), 100 * r.accuracy) for r, _ in pairs]
    point_colours = [colours.get(r.kind, "tab:gray") for r, _ in pairs]
    handles = [ax.scatter(*point, s=40, color=colour) for point, colour in zip(points, point_colours)]
    names = [f"{k + 1}  {r.variant}" + ("  [front]" if on else "") for k, (r, on) in enumerate(pairs)]
    for kind, colour in colours.items():  # the kind legend: one entry per kind shown
        if any(r.kind == kind for r, _ in pairs):
            ax.scatter([], [], s=40, color=colour, label=kind)
    if pairs:
        _mark_front(ax, points)
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency at batch {batch_size} (ms, log scale)" + (" -- served: one request" if batch_size == 1 else ""))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or f"accuracy vs latency, batch {batch_size}: the Pareto front", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    if handles:
        fig.legend(handles, names, loc="outside right upper", fontsize=7, frameon=False, handletextpad=0.3)
    _plain_log_ticks(ax, "x")
    _number_points(fig, ax, points, colours=point_colours)
    return fig


STATUS_COLOURS = {"2": "tab:green", "4": "tab:red", "5": "darkred"}  # answered green, refused and failed in reds
STATUS_MEANING = {"2": "answered", "4": "refused (client error)", "5": "server error"}


def status_counters(counters: dict[str, float], title: str = "TorchServe status counters (Prometheus)") -> Figure:
    """Bars of status-class counters (``Requests2XX``, ``Requests4XX``, ``Requests5XX``), in that order, errors red.

    Colours follow the status class, never the position: 2XX green, 4XX red, 5XX dark red (a list of
    colours zipped with the counters coloured errors green when the scrape listed them in another order).
    """
    names = sorted(counters, key=lambda n: n.removeprefix("Requests"))
    classes = [n.removeprefix("Requests")[:1] for n in names]
    fig, ax = plt.subplots(figsize=(5.5, 2.6), layout="constrained")
    ax.bar([f"{n.removeprefix('Requests')}\n{STATUS_MEANING.get(c, '')}" for n, c in zip(names, classes)],
           [counters[n] for n in names], color=[STATUS_COLOURS.get(c, "tab:gray") for c in classes])
    ax.set_ylabel("requests so far")
    ax.set_title(title, fontsize=9)
    return fig


def strategies(rows: list[dict[str, Any]], concurrency: tuple[int, ...] = (1, 8, 32)) -> Figure:
    """Lesson 07: throughput and p99 latency against concurrency, one line per deployment strategy.

    ``rows``: dicts with ``strategy``, ``concurrency``, ``images/s`` and ``p99 ms`` (one per load run).
    """
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in dict.fromkeys(r["strategy"] for r in rows):
        rs = sorted((r for r in rows if r["strategy"] == name), key=lambda r: r["concurrency"])
        ax[0].plot([r["concurrency"] for r in rs], [r["images/s"] for r in rs], "o-", label=name)
        ax[1].plot([r["concurrency"] for r in rs], [r["p99 ms"] for r in rs], "o-", label=name)
    ax[0].set(xscale="log", xlabel="concurrent clients", ylabel="images/s", title="throughput")
    ax[1].set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="p99 latency (ms)", title="tail latency")
    for a in ax:
        a.set_xticks(list(concurrency), [str(c) for c in concurrency])
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    return fig


def replica_timeline(points: list[tuple[float, int]], load_window: tuple[float, float], throughput: list[tuple[float, float]] | None = None,
                     max_replicas: int | None = None) -> Figure:
    """Lesson 08: RUNNING replicas over time (Ray Serve's own count, ``serve.status()``), the load window shaded.

    ``throughput``: optional (time, answered requests per second) drawn on a second axis.
    """
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ts, ns = zip(*points) if points else ((), ())
    ax.step(ts, ns, where="post", color="tab:blue", label="RUNNING replicas (serve.status)")
    ax.axvspan(*load_window, color="tab:orange", alpha=0.15, label="load: 32 concurrent clients")
    if max_replicas:
        ax.axhline(max_replicas, color="gray", ls=":", label=f"max_replicas={max_replicas}")
    ax.set(xlabel="seconds", ylabel="replicas", ylim=(0, (max_replicas or max(ns or (1,))) + 0.5))
    if throughput:
        ax2 = ax.twinx()
        ax2.plot(*zip(*throughput), color="tab:green", alpha=0.7, label="answers/s")
        ax2.set_ylabel("answers/s")
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def latency_vs_offered_load(curves: dict[str, list[dict[str, Any]]], slo_ms: float) -> Figure:
    """Lessons 07/08: p50 and p99 latency against offered load (the Server scenario's trials), one
    colour per server, the SLO drawn: where a curve leaves the SLO is that server's knee.

    ``curves``: server name -> rows with ``offered/s``, ``p50 ms`` and ``p99 ms`` (``ServerScenario.table()``).
    """
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, (name, rows) in enumerate(curves.items()):
        rows = sorted(rows, key=lambda r: r["offered/s"])
        x = [r["offered/s"] for r in rows]
        ax.plot(x, [r["p99 ms"] for r in rows], "o-", color=f"C{i}", label=f"{name} p99")
        ax.plot(x, [r["p50 ms"] for r in rows], ".:", color=f"C{i}", alpha=0.6, label=f"{name} p50")
    ax.axhline(slo_ms, color="black", ls="--", lw=1, label=f"SLO: p99 <= {slo_ms:g} ms")
    ax.set(xscale="log", yscale="log", xlabel="offered load (requests/s, Poisson arrivals)",
           ylabel="latency from intended send (ms)", title="latency against offered load (Server scenario trials)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    return fig


def rollout_timeline(panels: dict[str, tuple[list[dict[str, float]], list[dict[str, Any]]]]) -> Figure:
    """Lesson 10: one panel per canary run -- the candidate's share of the answers served and its
    disagreement and error rates per time bin (``canary.timeline``), the controller's decisions as
    vertical lines (``Controller.events``: start, step, promote, rollback)."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels)), sharex=True, squeeze=False)
    colours = {"start": "gray", "step": "tab:blue", "promote": "tab:green", "rollback": "tab:red"}
    for ax, (title, (bins, events)) in zip(axes[:, 0], panels.items()):
        t = [b["t"] for b in bins]
        ax.step(t, [b["share"] for b in bins], where="post", color="tab:blue", label="candidate's share of answers served")
        ax.plot(t, [b["disagreement"] for b in bins], "o", ms=3, color="tab:orange", label="candidate disagrees with the served version")
        ax.plot(t, [b["error_rate"] for b in bins], "x", ms=4, color="tab:red", label="candidate error rate")
        t0 = bins[0]["t0"] if bins and "t0" in bins[0] else 0.0
        for e in events:
            ax.axvline(e["t"] - t0, color=colours.get(e["action"], "black"), ls="--", lw=1)
            ax.annotate(e["action"], (e["t"] - t0, 1.02), fontsize=7, color=colours.get(e["action"], "black"), rotation=90,
                        va="bottom", ha="right")
        ax.set(ylim=(-0.03, 1.15), ylabel="fraction", title=title)
        ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="center right")
    axes[-1, 0].set_xlabel("seconds since the run started")
    fig.tight_layout()
    return fig
