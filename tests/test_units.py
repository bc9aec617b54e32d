"""Sizes on the command line (:func:`sidusctl.core.units.parse_size`), shared by
``vnode init``/``pnode init --btrfs-image`` and ``image cache prune --max-size``: what each
accepts, and what both refuse with exit 2 naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidusctl.core.errors import ConfigError
from sidusctl.core.units import parse_size
from tests.conftest import sidusctl
from tests.refusals import assert_refused


@pytest.mark.parametrize(("text", "want"), [
    ("6G", 6 * 2**30), ("512M", 512 * 2**20), ("512MiB", 512 * 2**20), ("512mb", 512 * 2**20),
    ("1.5GiB", 3 * 2**29), (" 4096 ", 4096), ("1T", 2**40), ("2k", 2048), ("1.5", 1),
    ("8388607T", 2**63 - 2**40)])
def test_sizes_in_binary_units(text: str, want: int) -> None:
    assert parse_size(text, "--x") == want


@pytest.mark.parametrize("bad", ["lots", "", "-5G", "+5G", "-1", "0", "0.5", "infT", "nan",
                                 "1e999G", "1e30T", "8E", "8388608T", "9" * 400, "5X", "5 G B",
                                 "5GG", "0x10"])
def test_refused_naming_where(bad: str) -> None:
    with pytest.raises(ConfigError, match="--btrfs-image") as e:
        parse_size(bad, "--btrfs-image")
    assert repr(bad) in str(e.value)


def test_zero_only_where_the_minimum_allows_it() -> None:
    assert parse_size("0", "--max-size", minimum=0) == 0
    assert parse_size("0G", "--max-size", minimum=0) == 0
    with pytest.raises(ConfigError, match="from 0 up"):
        parse_size("-0.5", "--max-size", minimum=0)
    with pytest.raises(ConfigError, match="from 1 byte up"):
        parse_size("0", "--btrfs-image")


def test_cache_prune_refuses_a_bad_max_size(tmp_path: Path) -> None:
    """Exit 2 naming the option and the value; nothing created in the state directory."""
    res = sidusctl("image", "cache", "prune", "--max-size", "4X", state=tmp_path, timeout=60)
    assert_refused(res, 2, "--max-size", "'4X'")
    assert list(tmp_path.iterdir()) == []
