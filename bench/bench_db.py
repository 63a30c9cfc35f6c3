"""Benchmark: rankings stored per second, one writer against 16 concurrent writers.

Each ranking is one ``session_scope`` transaction calling ``db.feedback.submit_ranking``
(validation, idempotency check, insert of the ranking and its items, commit), as the app
does per click. The reference is the single writer in the same process; the ratio is
16-writer throughput over single-writer throughput. SQLite runs with the default
``synchronous=FULL`` (fsync per commit) and with ``NORMAL``; ``--postgres-url`` adds a
PostgreSQL run in a temporary schema.

    python bench/bench_db.py                     # prints a table, writes bench/results/db_<date>.json
    python bench/bench_db.py --rankings 800 --json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from db import feedback as fb  # noqa: E402
from db.engine import dispose_engine, session_scope  # noqa: E402
from db.images import ImageStore, get_or_create_image  # noqa: E402

VARIANTS = 4


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """HEAD, with "+dirty" when db/ or this benchmark has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "db", "bench/bench_db.py"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _setup(url: str, store: ImageStore, n_requests: int, n_annotators: int) -> tuple[list[int], list[tuple[int, list[int]]]]:
    with session_scope(url) as s:
        owner = fb.create_user(s, "owner", "visitor")
        anns = [fb.create_user(s, f"ann{i}", "annotator", simulated=True).id for i in range(n_annotators)]
        from PIL import Image as PILImage

        src = get_or_create_image(s, store, PILImage.new("RGB", (16, 16), (0, 0, 0)))
        imgs = [get_or_create_image(s, store, PILImage.new("RGB", (16, 16), (i, 9, 9))).id for i in range(VARIANTS)]
        reqs = []
        for i in range(n_requests):
            r = fb.create_edit_request(s, owner.id, src.id, f"edit {i}", None, {"steps": 20}, consent=True)
            vs = fb.add_variants(s, r.id, [(img, seed, {"steps": 20}) for seed, img in enumerate(imgs)])
            reqs.append((r.id, [v.id for v in vs]))
    return anns, reqs


def run_case(url: str, store: ImageStore, total: int, writers: int) -> dict[str, float]:
    """Time ``total`` rankings split over ``writers`` threads (each thread its own annotator)."""
    per = total // writers
    anns, reqs = _setup(url, store, per, writers)
    barrier = threading.Barrier(writers + 1)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        barrier.wait()
        try:
            for i, (req, variants) in enumerate(reqs):
                ranks = {v: 1 + (j + t + i) % VARIANTS for j, v in enumerate(variants)}
                with session_scope(url) as s:
                    fb.submit_ranking(s, req, anns[t], ranks, seconds=1.0, submission_key=f"{t}-{req}")
        except BaseException as exc:  # noqa: BLE001 - reported after join
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(writers)]
    for th in threads:
        th.start()
    barrier.wait()
    start = time.perf_counter()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    n = per * writers
    return {"writers": writers, "rankings": n, "seconds": round(seconds, 3), "rankings_per_s": round(n / seconds, 1)}


def bench_sqlite(total: int, writers: int, synchronous: str) -> dict[str, object]:
    os.environ["HIVE_SQLITE_SYNCHRONOUS"] = synchronous
    out: dict[str, object] = {"backend": "sqlite", "synchronous": synchronous}
    for label, w in (("single", 1), ("concurrent", writers)):
        with tempfile.TemporaryDirectory(prefix="hive-bench-") as home:
            url = f"sqlite:///{home}/hive.db"
            out[label] = run_case(url, ImageStore(home), total, w)
            dispose_engine(url)
    return out


def bench_postgres(base_url: str, total: int, writers: int) -> dict[str, object]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(base_url)
    out: dict[str, object] = {"backend": "postgresql"}
    try:
        for label, w in (("single", 1), ("concurrent", writers)):
            schema = f"bench_{uuid.uuid4().hex[:10]}"
            with admin.begin() as c:
                c.execute(text(f'CREATE SCHEMA "{schema}"'))
            url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
                hide_password=False)
            try:
                with tempfile.TemporaryDirectory(prefix="hive-bench-") as home:
                    out[label] = run_case(url, ImageStore(home), total, w)
            finally:
                dispose_engine(url)
                with admin.begin() as c:
                    c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rankings", type=int, default=1600, help="rankings per case (default 1600)")
    p.add_argument("--writers", type=int, default=16, help="concurrent writer threads (default 16)")
    p.add_argument("--modes", default="FULL,NORMAL", help="SQLite synchronous modes to run")
    p.add_argument("--postgres-url", default=None, help="also run against this PostgreSQL URL")
    p.add_argument("--out", type=Path, default=None, help="result file (default bench/results/db_<date>.json)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    args = p.parse_args(argv)

    cases = [bench_sqlite(args.rankings, args.writers, m.strip().upper()) for m in args.modes.split(",") if m.strip()]
    if args.postgres_url:
        cases.append(bench_postgres(args.postgres_url, args.rankings, args.writers))
    for c in cases:
        c["ratio_concurrent_over_single"] = round(
            c["concurrent"]["rankings_per_s"] / c["single"]["rankings_per_s"], 2)  # type: ignore[index]
    today = dt.date.today().isoformat()
    result = {
        "benchmark": "db_rankings_per_second",
        "date": today,
        "commit": git_commit(),
        "device": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cases": cases,
    }
    for c in cases:
        name = f"{c['backend']}" + (f" synchronous={c['synchronous']}" if "synchronous" in c else "")
        print(f"{name:<28} single {c['single']['rankings_per_s']:>8.1f}/s   "  # type: ignore[index]
              f"{args.writers} writers {c['concurrent']['rankings_per_s']:>8.1f}/s   "  # type: ignore[index]
              f"ratio {c['ratio_concurrent_over_single']:.2f}")
    out = args.out or ROOT / "bench" / "results" / f"db_{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
