"""Many writers at once: every ranking stored exactly once; first use migrates once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db import feedback as fb
from db.engine import session_scope
from db.images import get_or_create_image
from db.migrate import head_revision
from db.models import Ranking, RankingItem
from tests.db_fixtures import HiveEnv, hive, hive_factory, png_bytes  # noqa: F401

THREADS = 16
PER_THREAD = int(os.environ.get("HIVE_TEST_RANKINGS_PER_THREAD", "500"))
VARIANTS = 4


def test_16_threads_500_rankings_each_stored_exactly_once(
    hive: HiveEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Locking is the same in both modes; NORMAL skips the per-commit fsync so that 8,000
    # commits fit the 2-core test budget (bench/bench_db.py measures FULL as well).
    monkeypatch.setenv("HIVE_SQLITE_SYNCHRONOUS", "NORMAL")
    with session_scope(hive.url) as s:
        owner = fb.create_user(s, "owner", "visitor")
        annotators = [fb.create_user(s, f"ann{i}", "annotator", simulated=True).id for i in range(THREADS)]
        src = get_or_create_image(s, hive.store, png_bytes((0, 0, 0)))
        imgs = [get_or_create_image(s, hive.store, png_bytes((i, 9, 9))).id for i in range(VARIANTS)]
        requests = []
        for i in range(PER_THREAD):
            req = fb.create_edit_request(s, owner.id, src.id, f"edit {i}", None, {"steps": 20}, consent=True)
            vs = fb.add_variants(s, req.id, [(img, seed, {"steps": 20}) for seed, img in enumerate(imgs)])
            requests.append((req.id, [v.id for v in vs]))

    errors: list[BaseException] = []
    returned: dict[int, set[int]] = {a: set() for a in annotators}
    start = threading.Barrier(THREADS)

    def work(t: int) -> None:
        ann = annotators[t]
        try:
            start.wait()
            for i, (req, variants) in enumerate(requests):
                # every thread ranks the same requests; ranks differ per thread and item
                ranks = {v: 1 + (j + t + i) % VARIANTS for j, v in enumerate(variants)}
                key = f"t{t}-r{req}"
                attempts = 2 if i % 25 == 0 else 1  # some resubmissions: a client retrying
                for _ in range(attempts):
                    with session_scope(hive.url) as s:
                        r = fb.submit_ranking(s, req, ann, ranks, seconds=1.0, submission_key=key)
                        returned[ann].add(r.id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]

    with session_scope(hive.url, write=False) as s:
        n_rankings = s.scalar(select(func.count()).select_from(Ranking))
        n_items = s.scalar(select(func.count()).select_from(RankingItem))
        per_pair = s.execute(
            select(Ranking.request_id, Ranking.annotator_id, func.count())
            .group_by(Ranking.request_id, Ranking.annotator_id)
            .having(func.count() != 1)
        ).all()
        keys = s.scalar(select(func.count(func.distinct(Ranking.submission_key))))
    assert n_rankings == THREADS * PER_THREAD
    assert n_items == THREADS * PER_THREAD * VARIANTS
    assert per_pair == []
    assert keys == THREADS * PER_THREAD
    assert sum(len(ids) for ids in returned.values()) == THREADS * PER_THREAD


def test_first_use_from_many_processes_migrates_once(hive: HiveEnv, tmp_path: Path) -> None:
    """Processes opening a brand-new database together all see it migrated to head."""
    # All processes import first, then open the database at the same instant.
    start_at = time.time() + 3
    env = {**os.environ, "HIVE_HOME": str(hive.home), "HIVE_DB_URL": hive.url, "START_AT": str(start_at)}
    root = Path(__file__).resolve().parents[1]
    code = (
        "import os, time\n"
        "from db.engine import get_engine\n"
        "time.sleep(max(0.0, float(os.environ['START_AT']) - time.time()))\n"
        "from db.migrate import current_revision\n"
        "print(current_revision(get_engine()))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, cwd=root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err
        assert out.strip() == head_revision()
    from db.engine import get_engine
    from db.migrate import current_revision

    assert current_revision(get_engine(hive.url)) == head_revision()
