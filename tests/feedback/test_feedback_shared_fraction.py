"""Under load, the share of shared pairs matches --shared-fraction (issue 16, item 12).

The generator here is slower than the raters, so the queue is dry most of the time and every
request waits. The chance of a shared pair must be drawn once per request: a draw on every
retry of the wait loop gives a waiting rater many chances, and shared pairs are over-served.
"""

from __future__ import annotations

import math
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest
from feedback_testing import judge_loop, write_raters

P = 0.2
RATERS, EACH = 8, 25


def issued_and_shared(db) -> tuple[int, int]:
    """(pairs issued, pairs issued that another rater had been issued before: the shared ones)."""
    with sqlite3.connect(db) as con:
        issued = con.execute("SELECT COUNT(*) FROM issues").fetchone()[0]
        shared = con.execute("SELECT COUNT(*) FROM issues i WHERE EXISTS (SELECT 1 FROM issues j "
                             "WHERE j.item_id = i.item_id AND j.rowid < i.rowid)").fetchone()[0]
    return issued, shared


@pytest.mark.slow
def test_served_shared_fraction_matches_the_setting_under_load(tmp_path, server_factory):
    """Each issued pair is shared with probability P (independently), so the shared count k of
    n issued pairs is Binomial(n, P): mean nP, standard deviation sqrt(nP(1-P)). We accept
    |k - nP| <= 4 standard deviations (a false alarm about once in 16,000 runs); for n = 200,
    P = 0.2 that is 40 +- 22.6. (The first request of each rater finds nothing judged yet and
    gets a fresh pair even when it drew "shared", which can only lower k by about P * 8.)"""
    names = [f"rater{i}" for i in range(RATERS)]
    tokens = write_raters(tmp_path / "raters.txt", names)
    server = server_factory(tmp_path / "f.sqlite", tmp_path / "raters.txt", "--shared-fraction", str(P),
                            "--pair-delay", "0.02", "--queue-size", "2")
    errors: list = []
    with ThreadPoolExecutor(max_workers=RATERS) as pool:
        futures = [pool.submit(judge_loop, server.url, tokens[n], EACH, [], errors) for n in names]
        for f in futures:
            f.result(timeout=300)
    assert errors == []
    n, k = issued_and_shared(tmp_path / "f.sqlite")
    assert n >= RATERS * EACH
    sd = math.sqrt(n * P * (1 - P))
    print(f"{k} of {n} issued pairs were shared: {k / n:.3f} (setting {P}, 4 sd = {4 * sd / n:.3f})")
    assert abs(k - n * P) <= 4 * sd, (k, n)
