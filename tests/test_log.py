"""sidusctl.core.log.background: while a server runs, its log lines are written by a thread of
their own, in batches (far fewer writes than lines), every line logged from many threads at
once reaches the handler once and in each thread's order, a traceback comes through, a
handler that is not a plain stream gets each record through its own ``emit``, and the
handlers are put back at the end."""

from __future__ import annotations

import io
import logging
import threading

from sidusctl.core import log


def test_background_writes_every_line_from_many_threads_then_restores_the_handlers() -> None:
    root = logging.getLogger("sidusctl")
    saved = (list(root.handlers), root.level)
    writes: list[str] = []  # what each write to the stream carried
    writer: set[str] = set()

    class Out(io.StringIO):
        def write(self, s: str) -> int:
            writes.append(s)
            writer.add(threading.current_thread().name)
            return super().write(s)

    out = Out()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    emitted: list[str] = []

    class Kept(logging.Handler):  # not a plain stream: its own emit, record by record
        def emit(self, record: logging.LogRecord) -> None:
            emitted.append(record.getMessage())

    kept = Kept(logging.WARNING)
    for h in saved[0]:
        root.removeHandler(h)
    root.addHandler(handler)
    root.addHandler(kept)
    root.setLevel(logging.INFO)
    lg = log.get_logger("test")
    try:
        with log.background():
            assert handler not in root.handlers  # the queue's handler stands in for them

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
        assert root.handlers == [handler, kept]
        lines = out.getvalue().splitlines()
        for k in range(8):
            mine = [ln for ln in lines if ln.startswith(f"INFO thread {k} ")]
            assert mine == [f"INFO thread {k} line {i}" for i in range(200)]
        text = out.getvalue()
        assert "ERROR failed" in text and "ValueError: boom" in text and "Traceback" in text
        assert "not at this level" not in text
        # every line was written by one thread, the writer's: not this one, not the 8; in
        # batches (8 threads x 200 lines logged in far less than BATCH_WAIT x 100)
        assert writer == {"sidusctl-log"}, writer
        assert len(writes) < len(lines) / 10, (len(writes), len(lines))
        # the WARNING handler: the error only, its traceback merged into the message
        assert len(emitted) == 1 and emitted[0].startswith("failed\nTraceback"), emitted
        assert emitted[0].endswith("ValueError: boom")
    finally:
        root.removeHandler(handler)
        root.removeHandler(kept)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
