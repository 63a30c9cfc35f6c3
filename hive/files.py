"""Atomic file writes: write beside the destination, then rename, so a crash never leaves a
half-written file where a reader expects a whole one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from PIL import Image


def _tmp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def save_png_atomic(img: Image.Image, path: Path) -> None:
    tmp = _tmp_for(path)
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def save_figure_atomic(fig, path: Path, **savefig_kwargs) -> None:
    """A matplotlib figure as a PNG, written beside `path` and renamed onto it."""
    tmp = _tmp_for(path)
    fig.savefig(tmp, format="png", **savefig_kwargs)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = _tmp_for(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
