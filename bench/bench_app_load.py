"""Load test of the app's API: N concurrent gradio_client clients, each editing and ranking.

Starts `python app.py` in a subprocess on a loopback port with a fresh HIVE_HOME, then runs
`--clients` threads (default 20). Each client opens a guest session and, `--rounds` times
(default 3), asks `/edit` for 4 variants, then `/submit_ranking` with a unique submission key,
then resends that same ranking (a client retry) which must not store a second row. Bounded in
count (clients x rounds) and in time (`--time-limit` seconds for the whole run).

At the end it checks the database: every acknowledged ranking is stored exactly once and none
is missing. It reports throughput (edits and rankings per second over the whole run) and the
latency of one 4-variant edit under this load (p50 / p95 / max), and, as a reference, the
latency of the same edit with no other client, measured first in the same server.

    python bench/bench_app_load.py                      # tiny random editor if models/toy-editor is missing
    python bench/bench_app_load.py --model models/toy-editor --json

Results: bench/results/app_load_<model>.json (with device, commit and parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

VARIANTS = 4


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summary(xs: list[float]) -> dict:
    if not xs:
        return {}
    return {"n": len(xs), "p50_s": round(percentile(xs, 0.5), 3), "p95_s": round(percentile(xs, 0.95), 3),
            "max_s": round(max(xs), 3), "mean_s": round(statistics.fmean(xs), 3)}


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "config", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the app did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="editor folder (default models/toy-editor, else a tiny random one)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="edit + ranking rounds per client")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per edit")
    ap.add_argument("--port", type=int, default=7961)
    ap.add_argument("--time-limit", type=float, default=600, help="seconds for the whole load phase")
    ap.add_argument("--label", default=None, help="model name in the result (default: the folder name)")
    ap.add_argument("--out", default=None, help="result file (default bench/results/app_load_<label>.json)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = ap.parse_args()

    from gradio_client import Client, handle_file

    from hive import toy
    from hive.zoo import DEFAULT_EDITOR

    tmp = Path(tempfile.mkdtemp(prefix="hive_load_"))
    model = args.model
    model_label = None
    if model is None:
        if (DEFAULT_EDITOR / "model_index.json").exists():
            model = str(DEFAULT_EDITOR)
        else:
            from tests.conftest import build_tiny_pipeline

            model = str(build_tiny_pipeline(tmp / "tiny-random-editor"))
            model_label = "tiny-random-editor"
    model_label = args.label or model_label or Path(model).name
    source = tmp / "scene.png"
    toy.sample_example(1).input_image.save(source)

    env = {**os.environ, "HIVE_HOME": str(tmp / "home"), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("HIVE_DB_URL", None)
    url = f"http://127.0.0.1:{args.port}/"
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", model, "--host", "127.0.0.1",
                             "--port", str(args.port), "--no-jobs"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "app.log", "w"))
    try:
        wait_up(url, proc)
        # reference: one client alone, same server, same edit
        solo = Client(url, verbose=False)
        tok = solo.predict(api_name="/guest")
        reference = []
        for i in range(4):
            t = time.perf_counter()
            solo.predict(handle_file(str(source)), "make the circle blue", VARIANTS, i, args.steps, 7.5, 1.5, False,
                         tok, api_name="/edit")
            reference.append(time.perf_counter() - t)
        reference = reference[1:]  # the first call warms up the editor

        edit_lat: list[float] = []
        rank_lat: list[float] = []
        acked: dict[str, int] = {}  # submission key -> ranking id acknowledged to the client
        errors: list[str] = []
        lock = threading.Lock()
        deadline = time.time() + args.time_limit
        barrier = threading.Barrier(args.clients)

        def client(c: int) -> None:
            try:
                cl = Client(url, verbose=False)
                token = cl.predict(api_name="/guest")
                barrier.wait(timeout=120)
                for r in range(args.rounds):
                    if time.time() > deadline:
                        return
                    t = time.perf_counter()
                    info, _ = cl.predict(handle_file(str(source)), f"make the circle blue {c} {r}", VARIANTS,
                                         1000 * c + r, args.steps, 7.5, 1.5, False, token, api_name="/edit")
                    t_edit = time.perf_counter() - t
                    v = info["variant_ids"]
                    key = f"load-{c}-{r}"
                    order = [v[(c + r) % 4], [v[(c + r + 1) % 4], v[(c + r + 2) % 4]], v[(c + r + 3) % 4]]
                    t = time.perf_counter()
                    res = cl.predict(token, info["request_id"], order, False, False, None, key,
                                     api_name="/submit_ranking")
                    t_rank = time.perf_counter() - t
                    again = cl.predict(token, info["request_id"], order, False, False, None, key,
                                       api_name="/submit_ranking")  # a retry: must not store twice
                    with lock:
                        edit_lat.append(t_edit)
                        rank_lat.append(t_rank)
                        acked[key] = res["ranking_id"]
                        if again != res:
                            errors.append(f"{key}: retry returned {again}, first {res}")
            except Exception as exc:  # recorded, and the run is reported as failed
                with lock:
                    errors.append(f"client {c}: {type(exc).__name__}: {exc}")

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(args.time_limit + 180)
        wall = time.perf_counter() - started
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    # the database after the run: every acknowledged ranking once, none lost
    os.environ["HIVE_HOME"] = env["HIVE_HOME"]
    os.environ.pop("HIVE_DB_URL", None)
    from sqlalchemy import func, select

    from db.engine import session_scope
    from db.models import Ranking

    with session_scope(write=False) as s:
        stored = dict(s.execute(select(Ranking.submission_key, Ranking.id)).all())
        per_key = dict(s.execute(select(Ranking.submission_key, func.count()).group_by(Ranking.submission_key)).all())
    lost = sorted(k for k in acked if k not in stored)
    duplicated = sorted(k for k, n in per_key.items() if n > 1)
    mismatched = sorted(k for k in acked if k in stored and stored[k] != acked[k])
    expected = args.clients * args.rounds

    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "bench": "app_load", "model": model_label, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "commit": commit,
        "date": time.strftime("%Y-%m-%d"), "clients": args.clients, "rounds": args.rounds, "variants": VARIANTS,
        "steps": args.steps, "wall_s": round(wall, 2),
        "edits_per_s": round(len(edit_lat) / wall, 3), "rankings_per_s": round(len(acked) / wall, 3),
        "edit_latency_under_load": summary(edit_lat), "ranking_latency_under_load": summary(rank_lat),
        "edit_latency_alone (reference)": summary(reference),
        "load_over_alone_p50": round(percentile(edit_lat, 0.5) / percentile(reference, 0.5), 2) if edit_lat else None,
        "rankings_expected": expected, "rankings_acknowledged": len(acked), "rankings_stored": len(stored),
        "lost": lost, "duplicated": duplicated, "mismatched": mismatched, "errors": errors[:20],
        "ok": not (lost or duplicated or mismatched or errors) and len(acked) == expected == len(stored),
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"app_load_{model_label}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
