"""`python -m hive queue`: fill the ranking queue from a dataset folder.

Wired into `hive/cli.py` with ``hive_app.cli.register(subparsers)``. By default it only
queues a `fill_queue` job: the running app's background worker samples the variants, and
annotators can start on the first requests while the rest are sampled. `--now` samples in
this process instead (no app needed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `queue` command to a `python -m hive` argument parser."""
    p = subparsers.add_parser(
        "queue", help="queue a dataset folder for ranking in the app (K variants per row, sampled in the background)",
        description="Queue every row of DIR/metadata.jsonl (input_image, edit_prompt; toy datasets also "
                    "clean_image, which makes gold items) for ranking. Variants are sampled by the promoted "
                    "editor in the app's background worker, or here with --now.")
    p.add_argument("--data", type=Path, required=True, help="dataset folder with metadata.jsonl")
    p.add_argument("--variants", type=int, default=4, help="variants per row, 2-8 (default 4)")
    p.add_argument("--gold-rate", type=float, default=0.2,
                   help="share of toy rows made gold items (their clean target among the variants); default 0.2")
    p.add_argument("--limit", type=int, default=None, help="queue at most this many rows")
    p.add_argument("--model", default=None, help="with --now: editor to register and use when none is promoted")
    p.add_argument("--now", action="store_true", help="sample here and now instead of in the app's worker")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_queue)
    return p


def cmd_queue(args: argparse.Namespace) -> int:
    from hive.editor import EditorInputError
    from hive_app.jobs import submit_job
    from hive_app.queue import read_rows
    from hive_app.service import MAX_VARIANTS, MIN_VARIANTS, AppInputError

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    data = args.data.resolve()
    if not MIN_VARIANTS <= args.variants <= MAX_VARIANTS:
        return fail(f"--variants must be between {MIN_VARIANTS} and {MAX_VARIANTS}")
    if not 0.0 <= args.gold_rate <= 1.0:
        return fail("--gold-rate must be between 0 and 1")
    try:
        rows = read_rows(data)
    except (AppInputError, ValueError) as exc:
        return fail(str(exc))
    config = {"data": str(data), "variants": args.variants, "gold_rate": args.gold_rate, "limit": args.limit}
    if not args.now:
        try:
            run_id = submit_job("fill_queue", config)
        except AppInputError as exc:
            return fail(str(exc))
        result = {"run_id": run_id, "rows": len(rows), "status": "queued"}
        message = (f"queued job {run_id}: the app's background worker will sample {args.variants} variants for "
                   f"each of {len(rows)} rows (start the app with `python app.py` if it is not running)")
    else:
        from hive_app.config import AppConfig, model_missing_message
        from hive_app.queue import fill_queue
        from hive_app.service import HiveService

        config = AppConfig.from_env(args.model)
        problem = model_missing_message(config.model)
        if problem:
            print(problem, file=sys.stderr)
            return 2
        try:
            result = fill_queue(HiveService(config), data, variants=args.variants,
                                gold_rate=args.gold_rate, limit=args.limit)
        except (AppInputError, EditorInputError) as exc:
            return fail(str(exc))
        message = f"queued {result['queued']} requests ({result['gold']} gold)"
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(message)
    return 0
