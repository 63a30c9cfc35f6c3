"""The app's settings: command-line flags over environment over defaults (DESIGN.md names the env).

Kept in one frozen object so that a reader sees every knob of the running app in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value and value.strip() else default


@dataclass(frozen=True)
class AppConfig:
    """Everything the app needs to know; build it with :meth:`from_env`."""

    #: the editor to serve when the registry has no promoted editor (or when `explicit_model`).
    model: str
    #: True when the model came from --model or HIVE_MODEL: then it is promoted at start.
    explicit_model: bool = False
    #: may people who are not signed in edit? rank? (each switchable, env HIVE_ANON_EDIT/HIVE_ANON_RANK)
    anonymous_edit: bool = True
    anonymous_rank: bool = True
    #: how many annotators rank each queued request (two or more give agreement figures).
    rankings_per_request: int = 2
    #: every n-th queue item of an annotator is a gold item, when gold items exist.
    gold_every: int = 5
    #: run the background job worker in this process.
    run_jobs: bool = True

    @staticmethod
    def from_env(model: str | None = None, **overrides) -> "AppConfig":
        from hive.zoo import DEFAULT_EDITOR

        explicit = bool(model or os.environ.get("HIVE_MODEL"))
        chosen = model or os.environ.get("HIVE_MODEL") or str(DEFAULT_EDITOR)
        values = dict(
            model=str(chosen),
            explicit_model=explicit,
            anonymous_edit=_flag("HIVE_ANON_EDIT", True),
            anonymous_rank=_flag("HIVE_ANON_RANK", True),
            rankings_per_request=_int("HIVE_RANKINGS_PER_REQUEST", 2),
            gold_every=_int("HIVE_GOLD_EVERY", 5),
        )
        values.update(overrides)
        return AppConfig(**values)


def model_missing_message(model: str) -> str | None:
    """A clear message when a local model folder is missing, None when it looks usable.

    Hub ids (``owner/name`` that is not a local path) are left to diffusers."""
    path = Path(model)
    if (path / "model_index.json").is_file():
        return None
    looks_local = path.is_absolute() or model.startswith(".") or path.exists() or model.count("/") != 1
    if not looks_local:
        return None
    from hive.zoo import DEFAULT_EDITOR

    hint = ""
    if path.resolve() == Path(DEFAULT_EDITOR).resolve():
        hint = ("\nThe embedded toy editor has not been built in this checkout yet: build it with the "
                "`python -m hive train ...` commands in the README, or serve another editor with "
                "`python app.py --model PATH` (or HIVE_MODEL=PATH).")
    return f"error: no editor at {model} (a StableDiffusionInstructPix2PixPipeline folder with model_index.json).{hint}"
