"""Does a change locator find the *named* object? (docs/reward.md, session 36)

    python scripts/locator_binding_probe.py [--locator-pixels] [--edits 1500] [--json OUT]

On held-out toy edits (removes, recolours, moves, resizes; seeds 500,000 past the locator's own
training edits), the clean target is set against the editor's mistake for the same instruction
(`toy.editor_mistake`: the named change on another object, or a move drawn as a copy). Each is
scored by cover minus spill under the locator's map (`locator_headroom.cover_minus_spill`); a pair
is right when the clean target scores higher. Reported by edit kind and by the referring expression
the instruction used ("the square", "the small square", "the red square", "the square at the top").
The locator is the default toy fit (20,000 edits, 4,000 steps), fitted first where not cached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hive import toy  # noqa: E402
from hive.change_locator import (DEFAULT_EXAMPLES, DEFAULT_STEPS, LOCATOR_SEED_BASE, changed_share,  # noqa: E402
                                 locator_inputs, toy_change_locator)
from hive.files import write_json_atomic  # noqa: E402
from hive.reward import RewardModel  # noqa: E402
from hive.zoo import TOY_EDIT_CLIP  # noqa: E402
from locator_headroom import cover_minus_spill  # noqa: E402  (scripts/, the script's own folder, is on sys.path)


def reference(instruction: str) -> str:
    """Which of `toy.referring_expressions`' templates named the object."""
    words = instruction.split()
    i = next(k for k, w in enumerate(words) if w in toy.SHAPES)
    before, placed = words[i - 1], i + 1 < len(words) and words[i + 1] in ("at", "on", "in")
    if before in toy.COLOURS:
        return "colour, shape and place" if placed else "colour and shape"
    if before in toy.SIZES:
        return "size and shape"
    return "shape and place" if placed else "shape only"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--locator-pixels", action="store_true")
    ap.add_argument("--edits", type=int, default=1500)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = RewardModel.from_backbone(TOY_EDIT_CLIP, change_locator=True, locator_pixels=args.locator_pixels)
    state, fit = toy_change_locator(TOY_EDIT_CLIP, DEFAULT_EXAMPLES, DEFAULT_STEPS, pixels=args.locator_pixels)
    model.change_locator.load_state_dict(state)
    seed_base = LOCATOR_SEED_BASE + 500_000
    sources, instructions, clean, wrong, kinds, refs = [], [], [], [], [], []
    k = 0
    while len(sources) < args.edits:
        example = toy.sample_example(seed_base + k)
        k += 1
        mistake = toy.editor_mistake(example.edit, np.random.default_rng([seed_base + k, 11]))
        if mistake is None or example.edit.kind == "add":
            continue
        sources.append(example.input_image)
        instructions.append(example.edit.instruction)
        clean.append(example.clean_image)
        wrong.append(mistake[0])
        kinds.append(example.edit.kind)
        refs.append(reference(example.edit.instruction))
    patches, words, mask, pixels = locator_inputs(model, sources, instructions)
    with torch.no_grad():
        expected = torch.sigmoid(model.change_locator(patches, words, mask, pixels))  # one map per edit
    right = (cover_minus_spill(changed_share(model, sources, clean), expected)
             > cover_minus_spill(changed_share(model, sources, wrong), expected))
    kinds_a, refs_a = np.array(kinds), np.array(refs)
    table = {"all": {"pairs": len(right), "right": float(right.mean())}}
    for name, column in (("kind", kinds_a), ("reference", refs_a)):
        for value in sorted(set(column)):
            sel = column == value
            table[f"{name}: {value}"] = {"pairs": int(sel.sum()), "right": float(right[sel].mean())}
    print(f"locator: {'pixel stem' if args.locator_pixels else 'default'}, "
          f"{fit['val_mass_on_changed']:.3f} of its held-out mass on changed patches")
    for name, row in table.items():
        print(f"{name:<36}{row['pairs']:>6}{row['right']:>8.3f}")
    if args.json:
        write_json_atomic(args.json, {"locator_pixels": args.locator_pixels, "locator": fit, "table": table})


if __name__ == "__main__":
    main()
