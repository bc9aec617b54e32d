"""sidusctl.core.log.background: while a server runs, its log lines are written by a thread of
their own, every line logged from many threads at once reaches the handler once and in each
thread's order, a traceback comes through, and the handlers are put back at the end."""

from __future__ import annotations

import io
import logging
import threading

from sidusctl.core import log


def test_background_writes_every_line_from_many_threads_then_restores_the_handlers() -> None:
    root = logging.getLogger("sidusctl")
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    for h in saved[0]:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    lg = log.get_logger("test")
    writer: set[str] = set()

    def emit(self: logging.Handler, record: logging.LogRecord) -> None:
        writer.add(threading.current_thread().name)
        logging.StreamHandler.emit(self, record)

    handler.emit = emit.__get__(handler)  # type: ignore[method-assign]
    try:
        with log.background():
            assert root.handlers != [handler]  # the queue's handler stands in for it

            def many(k: int) -> None:
                for i in range(200):
                    lg.info("thread %d line %d", k, i)

            threads = [threading.Thread(target=many, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            try:
                raise ValueError("boom")
            except ValueError:
                lg.exception("failed")
            lg.debug("not at this level")
        assert root.handlers == [handler]
        lines = out.getvalue().splitlines()
        for k in range(8):
            mine = [ln for ln in lines if ln.startswith(f"INFO thread {k} ")]
            assert mine == [f"INFO thread {k} line {i}" for i in range(200)]
        text = out.getvalue()
        assert "ERROR failed" in text and "ValueError: boom" in text and "Traceback" in text
        assert "not at this level" not in text
        # every line was written by one thread, the listener's: not this one, not the 8
        assert len(writer) == 1 and "_monitor" in next(iter(writer)), writer
    finally:
        root.removeHandler(handler)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
