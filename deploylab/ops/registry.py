"""A model registry (lesson 10): numbered versions of a model, their metrics, sha256 and lineage, and aliases.

The vocabulary is MLflow's model registry, so that what a learner does here maps one to one onto
``mlflow.MlflowClient`` (the lesson prints the equivalent calls):

- a *registered model* (``student``) has *versions* 1, 2, 3 ... (``register`` ~ ``mlflow.register_model``);
- each version is an immutable copy of an ONNX file and its model card, with its metrics (accuracy,
  agreement with the served version), sha256 and lineage (what it was made from, how);
- an *alias* names the version a role uses (``champion``: served; ``challenger``: in canary),
  ``set_alias`` ~ ``MlflowClient.set_registered_model_alias`` and ``by_alias`` ~
  ``get_model_version_by_alias``; every alias move is kept with its time and reason (the audit
  trail a rollback needs).

Why not MLflow itself: measured in the lesson's build notes (docs/ARCHITECTURE.md, "Decisions"):
``mlflow`` 3.18 does not resolve offline here (its ``mlflow-tracing`` 3.18 is not on the index) and
3.17.2 pulls 36 packages (pandas, pyarrow, scikit-learn, scipy, Flask, gunicorn...); the skinny
client with SQLAlchemy and Alembic works, but creating its SQLite store runs its schema migrations
on every fresh store. The kit already writes what a registry needs -- every artefact has a card
with its sha256, accuracy and source -- so this registry is one JSON file over those cards.

Storage: ``<root>/registry.json`` (written atomically) and ``<root>/<name>/v<N>/`` holding the
version's copy of the file and its card. :meth:`Registry.model_path` checks the sha256 before
anything serves the file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..files import atomic_path, atomic_write_json, sha256_file

ALIASES = ("champion", "challenger")  # served / in canary; any other name is allowed too


class RegistryError(RuntimeError):
    """A version or alias that does not exist, or a file that no longer matches its registered sha256."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: where its file is (relative to the registry), what it is, where it came from."""

    name: str
    version: int
    file: str
    sha256: str
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    created: str = ""

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``, the URI MLflow would use for it."""
        return f"models:/{self.name}/{self.version}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Registry:
    """The registry under ``root`` (created on first use)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.index = self.root / "registry.json"

    def _read(self) -> dict[str, Any]:
        if not self.index.is_file():
            return {"models": {}}
        return json.loads(self.index.read_text())

    def _write(self, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.index, state)

    def _model(self, state: dict[str, Any], name: str) -> dict[str, Any]:
        if name not in state["models"]:
            raise RegistryError(f"no registered model {name!r}; registered: {sorted(state['models']) or 'none'}")
        return state["models"][name]

    def register(self, name: str, onnx_path: str | os.PathLike, *, metrics: dict[str, float],
                 lineage: dict[str, Any], tags: dict[str, str] | None = None) -> ModelVersion:
        """Copy ``onnx_path`` (and its ``.card.json`` if there is one) in as the next version of ``name``.

        The copy is the registry's own: a file replaced later where it came from does not change
        what this version is. Its sha256 is taken from the copy.
        """
        src = Path(onnx_path)
        if not src.is_file():
            raise RegistryError(f"no file {src} to register")
        state = self._read()
        model = state["models"].setdefault(name, {"versions": [], "aliases": {}, "events": []})
        number = len(model["versions"]) + 1
        folder = self.root / name / f"v{number}"
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / src.name
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        card = src.with_suffix(".card.json")
        if card.is_file():
            with atomic_path(dst.with_suffix(".card.json")) as tmp:
                shutil.copyfile(card, tmp)
        mv = ModelVersion(name, number, str(dst.relative_to(self.root)), sha256_file(dst),
                          {k: float(v) for k, v in metrics.items()}, dict(lineage), dict(tags or {}), _now())
        model["versions"].append(asdict(mv))
        model["events"].append({"time": mv.created, "event": "registered", "version": number})
        self._write(state)
        return mv

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of ``name``, oldest first."""
        return [ModelVersion(**v) for v in self._model(self._read(), name)["versions"]]

    def get(self, name: str, version: int) -> ModelVersion:
        """Version ``version`` of ``name``."""
        for mv in self.versions(name):
            if mv.version == version:
                return mv
        raise RegistryError(f"{name!r} has no version {version}")

    def set_alias(self, name: str, alias: str, version: int | None, reason: str = "") -> None:
        """Point ``alias`` at ``version`` (None removes it); the move is kept with its time and reason."""
        state = self._read()
        model = self._model(state, name)
        if version is not None and not any(v["version"] == version for v in model["versions"]):
            raise RegistryError(f"{name!r} has no version {version}")
        before = model["aliases"].get(alias)
        if version is None:
            model["aliases"].pop(alias, None)
        else:
            model["aliases"][alias] = version
        model["events"].append({"time": _now(), "event": f"alias {alias}", "from": before, "to": version, "reason": reason})
        self._write(state)

    def aliases(self, name: str) -> dict[str, int]:
        """alias -> version for ``name``."""
        return dict(self._model(self._read(), name)["aliases"])

    def by_alias(self, name: str, alias: str) -> ModelVersion:
        """The version ``alias`` points at (``models:/name@alias``)."""
        aliases = self.aliases(name)
        if alias not in aliases:
            raise RegistryError(f"{name!r} has no alias {alias!r}; its aliases: {aliases or 'none'}")
        return self.get(name, aliases[alias])

    def events(self, name: str) -> list[dict[str, Any]]:
        """The audit trail of ``name``: registrations and alias moves, oldest first."""
        return list(self._model(self._read(), name)["events"])

    def model_path(self, mv: ModelVersion) -> Path:
        """The version's file, after checking that its sha256 is still the registered one."""
        path = self.root / mv.file
        if not path.is_file():
            raise RegistryError(f"{mv.uri}: its file {path} is missing")
        digest = sha256_file(path)
        if digest != mv.sha256:
            raise RegistryError(f"{mv.uri}: {path.name} has sha256 {digest[:12]}..., registered {mv.sha256[:12]}...: "
                                "the file was changed after registration; register it again as a new version")
        return path

    def rows(self, name: str) -> list[dict[str, Any]]:
        """One row per version (for ``tables.markdown_table``): version, aliases, metrics, lineage, sha256."""
        by_version: dict[int, list[str]] = {}
        for alias, v in self.aliases(name).items():
            by_version.setdefault(v, []).append(alias)
        out = []
        for mv in self.versions(name):
            row: dict[str, Any] = {"version": mv.version, "aliases": ", ".join(sorted(by_version.get(mv.version, []))) or "-"}
            row.update({k: round(v, 4) for k, v in mv.metrics.items()})
            row["made from"] = mv.lineage.get("made_by", "-")
            row["sha256"] = mv.sha256[:12]
            out.append(row)
        return out
