"""Lesson 06's exercise: ``docker run`` arguments for a small VM with a local Prometheus.

The learner builds, without starting anything, the arguments of a container with 1 GB of memory
whose metrics port is published too (``my_args``, from ``container.Container(...).run_args()``),
and names the host address the published ports are bound to (``bound_to``).
"""

from __future__ import annotations

from typing import Any

from . import Exercise, WrongAnswer

NAME = "docker_run_args"
MEMORY = "1g"
LOOPBACK = "127.0.0.1"


def _published(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--publish"]


def solution(*, tag: str) -> dict[str, Any]:
    """The lesson's secure defaults with 1 GB of memory and the metrics port published too."""
    from deploylab.serving import container

    my_args = container.Container(tag, memory="1g", publish_metrics=True).run_args()
    return {"my_args": my_args, "bound_to": "127.0.0.1"}  # every --publish is 127.0.0.1::PORT


def check(answers: dict[str, Any], *, tag: str) -> str:
    """The sentence printed for a right answer; :class:`WrongAnswer` with a hint otherwise."""
    from deploylab.serving import container

    args, bound_to = answers["my_args"], answers["bound_to"]
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise WrongAnswer(f"my_args is the list of strings that Container(...).run_args() returns, got {type(args).__name__}")
    published = _published(args)
    want = [f"{LOOPBACK}::{container.INFERENCE_PORT}", f"{LOOPBACK}::{container.METRICS_PORT}"]
    if sorted(published) != sorted(want):
        raise WrongAnswer(f"published ports {published}: the inference API and the metrics port must both be published, "
                          "on the host's loopback only (publish_metrics=True)")
    if "--memory" not in args or args[args.index("--memory") + 1] != MEMORY:
        raise WrongAnswer(f"the VM has 1 GB: the container's --memory must be {MEMORY!r}")
    if "--read-only" not in args or "--cap-drop" not in args:
        raise WrongAnswer("keep the lesson's secure defaults (read-only root filesystem, every capability dropped)")
    if tag in args:
        raise WrongAnswer("run_args() leaves the image out; `docker run` takes it after the arguments")
    if bound_to != LOOPBACK:
        raise WrongAnswer(f"bound_to={bound_to!r}: read the host part of each --publish value (HOST::CONTAINER_PORT)")
    return "inference and metrics, both on the host's loopback only; 1 GB; still read-only"


def example_inputs() -> dict[str, Any]:
    """The lesson's image tag (nothing is started or built)."""
    from deploylab.serving import docker_build

    return {"tag": f"{docker_build.IMAGE}:workshop"}


def wrong_answers(answers: dict[str, Any], *, tag: str) -> list[dict[str, Any]]:
    """Near misses: the metrics port left unpublished, the default memory, a writable root, every address, the image included."""
    from deploylab.serving import container

    right = answers["my_args"]
    writable = container.Container(tag, memory="1g", publish_metrics=True, read_only=False).run_args()
    every_address = [a.replace(f"{LOOPBACK}::", "0.0.0.0::") for a in right]
    return [
        {"my_args": container.Container(tag, memory="1g").run_args(), "bound_to": LOOPBACK},
        {"my_args": container.Container(tag, publish_metrics=True).run_args(), "bound_to": LOOPBACK},
        {"my_args": writable, "bound_to": LOOPBACK},
        {"my_args": every_address, "bound_to": LOOPBACK},
        {"my_args": [*right, tag], "bound_to": LOOPBACK},
        {"my_args": right, "bound_to": "0.0.0.0"},
        {"my_args": " ".join(right), "bound_to": LOOPBACK},
    ]


EXERCISE = Exercise(
    name=NAME,
    lesson="06_docker",
    answers=("my_args", "bound_to"),
    check=check,
    solution=solution,
    example_inputs=example_inputs,
    wrong_answers=wrong_answers,
)
