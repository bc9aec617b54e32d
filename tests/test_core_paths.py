"""sidusctl.core.paths.proc_link_within: what a /proc link names, against a directory (the
HTTP server's check of an opened file, crash recovery's search for processes in a root)."""

from __future__ import annotations

import os
from pathlib import Path

from sidusctl.core.paths import proc_link_within


def test_a_proc_link_is_within_its_directory_only() -> None:
    assert proc_link_within("/srv/a", "/srv/a") and proc_link_within("/srv/a", "/srv/a/")
    assert proc_link_within("/srv/a/b/c", "/srv/a")
    assert not proc_link_within("/srv/ab", "/srv/a")  # a sibling sharing the prefix
    assert not proc_link_within("/srv", "/srv/a")
    assert proc_link_within("/anything", "/")


def test_a_file_unlinked_since_it_was_opened_is_still_where_it_was(tmp_path: Path) -> None:
    f = tmp_path / "cfg"
    f.write_text("x")
    fd = os.open(f, os.O_RDONLY)
    try:
        f.unlink()  # as an atomic replace leaves the open file
        link = os.readlink(f"/proc/self/fd/{fd}")
        assert link.endswith(" (deleted)")
        assert proc_link_within(link, str(tmp_path.resolve()))
        assert not proc_link_within(link, str(tmp_path.resolve() / "other"))
    finally:
        os.close(fd)
