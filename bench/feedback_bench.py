"""Feedback insert throughput at concurrency 16: rows/s on SQLite and on PostgreSQL.

Each of 16 threads calls `FeedbackStore.add_feedback` (one committed transaction per row, as
`POST /v1/feedback` does) for a fixed number of rows. PostgreSQL runs in a throwaway cluster
started here (tests/pgcluster.py). Usage:
    PYTHONPATH=src:tests python bench/feedback_bench.py [--rows 4000] [--threads 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tuneforge.feedback.store import FeedbackStore  # noqa: E402
from tuneforge.feedback.validate import FeedbackItem  # noqa: E402

from feedback_helpers import make_record  # noqa: E402
from pgcluster import start_cluster, stop_cluster  # noqa: E402


def measure(url: str, rows: int, threads: int) -> dict[str, float]:
    store = FeedbackStore(url, busy_timeout_s=30)
    rec = make_record()
    store.write(rec)
    per_thread = rows // threads
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(per_thread):
                item = FeedbackItem(rec.id, 1, "thumbs", comment="ok", idempotency_key=f"{t}-{i}")
                store.add_feedback(item)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    stored = len(store.feedback())
    store.close()
    if errors:
        raise errors[0]
    assert stored == per_thread * threads, stored
    return {"rows": stored, "seconds": elapsed, "rows_per_s": stored / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = measure(f"sqlite:///{tmp}/bench.db", args.rows, args.threads)
    print(f"sqlite      {sqlite['rows']} rows in {sqlite['seconds']:.1f}s: {sqlite['rows_per_s']:.0f} rows/s")  # fmt: skip
    cluster = start_cluster()
    try:
        pg = measure(cluster.url(cluster.create_database()), args.rows, args.threads)
    finally:
        stop_cluster(cluster)
    print(f"postgresql  {pg['rows']} rows in {pg['seconds']:.1f}s: {pg['rows_per_s']:.0f} rows/s")


if __name__ == "__main__":
    main()
