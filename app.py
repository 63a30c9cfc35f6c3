"""`python app.py`: serve the HIVE demo (edit, rank, compare, dashboard, admin) on the promoted editor.

With no setting it serves the embedded toy editor (models/toy-editor) on 127.0.0.1:7860, with
data under ./data. `--model`, `--host`, `--port` and the environment (HIVE_HOME, HIVE_DB_URL,
HIVE_MODEL, HIVE_ANON_EDIT, HIVE_ANON_RANK, HIVE_RANKINGS_PER_REQUEST, HIVE_GOLD_EVERY)
configure it. See docs/app.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import argparse  # noqa: E402
import sys  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve the HIVE web app.")
    p.add_argument("--model", help="editor to serve (folder or hub id); default HIVE_MODEL or models/toy-editor")
    p.add_argument("--host", default=os.environ.get("HIVE_HOST", "127.0.0.1"),
                   help="address to listen on (0.0.0.0 for every interface); default 127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("HIVE_PORT", "7860")), help="default 7860")
    p.add_argument("--no-anonymous-edit", action="store_true", help="only signed-in accounts may edit")
    p.add_argument("--no-anonymous-rank", action="store_true", help="only signed-in annotators may rank")
    p.add_argument("--rankings-per-request", type=int, default=None,
                   help="annotators per queued request (default 2, env HIVE_RANKINGS_PER_REQUEST)")
    p.add_argument("--no-jobs", action="store_true", help="do not run the background job worker in this process")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hive_app.config import AppConfig, model_missing_message

    overrides = {}
    if args.no_anonymous_edit:
        overrides["anonymous_edit"] = False
    if args.no_anonymous_rank:
        overrides["anonymous_rank"] = False
    if args.rankings_per_request is not None:
        overrides["rankings_per_request"] = args.rankings_per_request
    if args.no_jobs:
        overrides["run_jobs"] = False
    config = AppConfig.from_env(args.model, **overrides)
    problem = model_missing_message(config.model)
    if problem:
        print(problem, file=sys.stderr)
        return 2

    from hive_app.server import serve

    serve(config, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
