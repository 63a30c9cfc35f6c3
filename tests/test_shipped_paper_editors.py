"""The paper experiment's editors shipped under models/toy-paper load and sample as documented."""

from __future__ import annotations

import json

import numpy as np
import torch

from hive import toy
from hive.editor import Editor
from hive.zoo import MODELS_DIR

PAPER = MODELS_DIR / "toy-paper"


def test_shipped_paper_editors_load_and_the_condition_editor_adds_its_top_level():
    assert sorted(p.name for p in PAPER.iterdir()) == ["hive-condition", "hive-weighted", "noisy-sft", "shared"]
    editors = {name: Editor(PAPER / name) for name in ("noisy-sft", "hive-condition", "hive-weighted")}
    cond = editors["hive-condition"]
    info = json.loads((PAPER / "hive-condition" / "hive.json").read_text())
    # the editor appends the top level by itself: people type the plain instruction
    assert cond.prompt_for("make the circle red") == "make the circle red, image quality is five out of five"
    assert editors["noisy-sft"].prompt_for("make the circle red") == "make the circle red"
    assert info["finetune"]["by_origin"] == {"data": 2000, "data-inverse": 2000}  # the scored triplets only
    # its trained text layer ships in its own text encoder; the others share the baseline's
    layers = {n: e.fast.pipe.text_encoder.config.num_hidden_layers for n, e in editors.items()}
    assert layers["hive-condition"] == layers["noisy-sft"] + info["finetune"]["config"]["sft"]["text_layers"]
    assert layers["hive-weighted"] == layers["noisy-sft"] and info["finetune"]["config"]["sft"]["text_layers"] == 1
    ex = toy.sample_example(123)
    out = cond.sample([ex.input_image], [cond.prompt_for(ex.edit.instruction)], [[0]], 2)[0][0]
    assert out.size == ex.input_image.size and np.asarray(out).std() > 0
    unets = {n: torch.cat([p.flatten() for p in e.fast.pipe.unet.parameters()]) for n, e in editors.items()}
    assert not torch.equal(unets["hive-condition"], unets["noisy-sft"])
    assert not torch.equal(unets["hive-weighted"], unets["noisy-sft"])
