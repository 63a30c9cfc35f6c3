"""The model registry as the loop and the CLI use it: versions, promotion, rollback, fresh folders.

A thin layer over `db.feedback` (`model_versions`: kind, name, path, parent, metrics, status
candidate | promoted | retired; the database allows one promoted version per kind). What it adds:
versions named by id or name, checks that a promoted folder exists, idempotent registration (a
resumed loop round registers its candidate once), and the rule that new models go to fresh
folders under HIVE_HOME/models/<kind>/ and never over a registered model's folder.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import make_url

from db import feedback as fb
from db.config import db_url, hive_home
from db.engine import session_scope
from db.models import MODEL_KINDS, ModelVersion


class RegistryError(ValueError):
    """A registry action that cannot be done; the message says why."""


def version_json(mv: ModelVersion) -> dict[str, Any]:
    return {"id": mv.id, "kind": mv.kind, "name": mv.name, "path": mv.path, "parent_id": mv.parent_id,
            "status": mv.status, "metrics": mv.metrics,
            "created_at": mv.created_at.isoformat() if mv.created_at else None,
            "promoted_at": mv.promoted_at.isoformat() if mv.promoted_at else None}


def _check_kind(kind: str) -> None:
    if kind not in MODEL_KINDS:
        raise RegistryError(f"unknown model kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}")


def _find(session, ident: str | int, kind: str) -> ModelVersion:
    """A version by id (a number) or by name within `kind`."""
    text = str(ident).strip()
    mv = None
    if text.isdigit():
        mv = session.get(ModelVersion, int(text))
        if mv is not None and mv.kind != kind:
            raise RegistryError(f"model version {text} is a {mv.kind} model, not a {kind} model")
    if mv is None:
        mv = session.scalar(select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.name == text))
    if mv is None:
        raise RegistryError(f"no {kind} model version with id or name {text!r} (see `python -m hive models`)")
    return mv


def list_versions(kind: str | None = None, url: str | None = None) -> list[dict[str, Any]]:
    with session_scope(url, write=False) as s:
        q = select(ModelVersion).order_by(ModelVersion.id)
        if kind is not None:
            _check_kind(kind)
            q = q.where(ModelVersion.kind == kind)
        return [version_json(mv) for mv in s.scalars(q)]


def get_version(ident: str | int, kind: str = "editor", url: str | None = None) -> dict[str, Any]:
    with session_scope(url, write=False) as s:
        return version_json(_find(s, ident, kind))


def promoted(kind: str = "editor", url: str | None = None) -> dict[str, Any] | None:
    with session_scope(url, write=False) as s:
        mv = fb.promoted_version(s, kind)
        return version_json(mv) if mv is not None else None


def check_loadable(path: str, kind: str) -> None:
    """A local model folder must be complete before it is served; hub ids are taken on trust."""
    p = Path(path)
    if not p.exists():
        if p.is_absolute() or path.startswith(".") or path.count("/") != 1:
            raise RegistryError(f"the model folder {path} does not exist")
        return  # looks like a hub id (org/name)
    marker = "model_index.json" if kind == "editor" else "config.json"
    if not (p / marker).exists():
        raise RegistryError(f"{path} is not a complete {kind} model folder (no {marker})")


def promote(ident: str | int, kind: str = "editor", url: str | None = None) -> dict[str, Any]:
    """Promote a version (the previously promoted one of its kind is retired)."""
    _check_kind(kind)
    with session_scope(url) as s:
        mv = _find(s, ident, kind)
        check_loadable(mv.path, kind)
        before = fb.promoted_version(s, kind)
        fb.set_model_status(s, mv.id, "promoted")
        out = version_json(mv)
        out["previous_id"] = before.id if before is not None and before.id != mv.id else None
        return out


def rollback(kind: str = "editor", url: str | None = None) -> dict[str, Any]:
    """Retire the promoted version and promote the one promoted most recently before it."""
    _check_kind(kind)
    try:
        with session_scope(url) as s:
            current = fb.promoted_version(s, kind)
            mv = fb.rollback_model(s, kind)
            check_loadable(mv.path, kind)
            out = version_json(mv)
            out["previous_id"] = current.id if current is not None else None
            return out
    except fb.FeedbackError as e:
        raise RegistryError(str(e)) from None


def register(kind: str, name: str, path: str | Path, *, parent_id: int | None = None,
             metrics: dict[str, Any] | None = None, url: str | None = None) -> int:
    """Register a candidate; registering the same name and path again returns the same id
    (a resumed round), the same name with another path is refused."""
    _check_kind(kind)
    path = str(Path(path).resolve()) if Path(path).exists() else str(path)
    with session_scope(url) as s:
        mv = s.scalar(select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.name == name))
        if mv is not None:
            if mv.path != path:
                raise RegistryError(f"a {kind} model named {name!r} is already registered at {mv.path}")
            if metrics:
                fb.update_model_metrics(s, mv.id, metrics)
            return mv.id
        return fb.register_model_version(s, kind, name, path, parent_id=parent_id, metrics=metrics).id


def ensure_registered(path: str | Path, kind: str = "editor", promote_if_none: bool = False,
                      url: str | None = None) -> dict[str, Any]:
    """The version registered at `path` (registered now if it is not, named after the folder);
    with `promote_if_none` it is promoted when no version of its kind is (what the app does
    when it starts serving an editor)."""
    _check_kind(kind)
    path = str(Path(path).resolve()) if Path(path).exists() else str(path)
    with session_scope(url) as s:
        mv = s.scalar(select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.path == path)
                      .order_by(ModelVersion.id))
        if mv is None:
            stem = Path(path).name or "model"
            name, n = stem, 1
            while s.scalar(select(ModelVersion.id).where(ModelVersion.kind == kind, ModelVersion.name == name)):
                n += 1
                name = f"{stem}-{n}"
            mv = fb.register_model_version(s, kind, name, path)
        if promote_if_none and fb.promoted_version(s, kind) is None:
            fb.set_model_status(s, mv.id, "promoted")
        return version_json(mv)


def check_name(name: str) -> None:
    """A version name is a plain folder name: "../x" would publish (and replace) outside models/<kind>/."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        raise RegistryError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, "
                            "starting with a letter or digit)")


def models_root() -> Path:
    return hive_home() / "models"


def _inside(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def _store_missing(url: str | None) -> bool:
    """A SQLite store whose file does not exist yet registers nothing (and is not created to say so)."""
    u = make_url(url or db_url())
    return (u.get_backend_name() == "sqlite" and u.database not in (None, "", ":memory:")
            and not u.query.get("uri") and not Path(u.database).exists())


def assert_fresh(dest: str | Path, url: str | None = None) -> Path:
    """Refuse a destination that is, holds, or lies inside any registered model's folder: new
    versions never overwrite a model that is (or was) served."""
    dest = Path(dest).resolve()
    if _store_missing(url):
        return dest
    with session_scope(url, write=False) as s:
        for mv in s.scalars(select(ModelVersion)):
            p = Path(mv.path)
            if not p.exists():
                continue
            p = p.resolve()
            if dest == p or _inside(dest, p) or _inside(p, dest):
                raise RegistryError(f"{dest} would overwrite the {mv.status} {mv.kind} model {mv.name!r} ({p}); "
                                    "new versions go to fresh folders")
    return dest


def publish(src: str | Path, kind: str, name: str, url: str | None = None) -> Path:
    """Copy a finished model folder to HIVE_HOME/models/<kind>/<name> (fresh; copied beside and
    renamed in). A leftover folder of the same name that no version is registered at (a crash
    between copy and registration) is replaced; a registered one never is."""
    _check_kind(kind)
    check_name(name)
    dest = models_root() / kind / name
    assert_fresh(dest, url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest
