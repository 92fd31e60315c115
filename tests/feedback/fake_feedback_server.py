"""A feedback server whose pairs come from `FakePairSource` instead of a model.

Tests start it as a subprocess (so they can SIGKILL it) and load `FakePairSource` from it.
    python tests/feedback/fake_feedback_server.py --db X --raters R --port 0 [--xss] [--two-checkpoints]
It prints `URL http://127.0.0.1:PORT/` once it is listening.
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from pathlib import Path

XSS_PROMPT = '<b>bold?</b><script>window.__xss = "prompt"</script>'
XSS_A = '<script>window.__xss = "a"</script>A says <img src=x onerror="window.__xss = \'img-a\'">'
XSS_B = '<img src=x onerror="window.__xss = \'img-b\'"><svg onload="window.__xss = \'svg\'"></svg> & B'


class FakePairSource:
    """Instant, deterministic pairs: completion texts name the pair number and the side."""

    def __init__(self, xss: bool = False, two_checkpoints: bool = False, delay_s: float = 0.0,
                 hold: str | None = None):
        self.xss, self.two, self.delay_s, self.hold = xss, two_checkpoints, delay_s, hold
        self._count = itertools.count()
        self._lock = threading.Lock()

    def make_pair(self, prompt: str):
        from palm_rlhf.feedback.pairs import PairDraft

        if self.delay_s:
            time.sleep(self.delay_s)  # a generator slower than the raters: the queue runs dry
        while self.hold and not Path(self.hold).exists():  # no pair until the test says so
            time.sleep(0.05)
        with self._lock:
            n = next(self._count)
        a, b = (f"{XSS_A} #{n}", f"{XSS_B} #{n}") if self.xss else (f"pair {n} side A", f"pair {n} side B")
        ckpt_b = "fake-2" if self.two else "fake-1"
        return PairDraft(a, b, "fake-1", ckpt_b, {"max_new_tokens": 8, "temperature": 1.0})


def main() -> None:
    from palm_rlhf.feedback.app import create_app
    from palm_rlhf.feedback.auth import read_raters
    from palm_rlhf.feedback.pairs import PairQueue
    from palm_rlhf.feedback.server import bind, serve
    from palm_rlhf.feedback.store import FeedbackStore

    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--raters", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--xss", action="store_true")
    p.add_argument("--two-checkpoints", action="store_true")
    p.add_argument("--queue-size", type=int, default=8)
    p.add_argument("--shared-fraction", type=float, default=0.0)
    p.add_argument("--pair-delay", type=float, default=0.0, help="seconds to make each pair")
    p.add_argument("--page-wait", type=float, default=10.0, help="seconds the judging page waits for a pair")
    p.add_argument("--hold", help="make no pair until this file exists")
    args = p.parse_args()

    store = FeedbackStore(args.db, seed=0)
    prompts = [XSS_PROMPT] if args.xss else [f"prompt number {i}" for i in range(7)]
    queue = PairQueue(store, FakePairSource(args.xss, args.two_checkpoints, args.pair_delay, args.hold), prompts, size=args.queue_size)
    app = create_app(store, queue, read_raters(args.raters), shared_fraction=args.shared_fraction,
                     max_body_bytes=4096, wait_s=args.page_wait)
    sock = bind("127.0.0.1", args.port)
    print(f"URL http://127.0.0.1:{sock.getsockname()[1]}/", flush=True)
    serve(app, sock)


if __name__ == "__main__":
    main()
