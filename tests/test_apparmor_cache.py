"""sidusctl.image.apparmor's plan: which kernels of an image get an AppArmor policy cache at
build time, and why none. The compilation itself runs in every build of ``minimal`` (the
shared image: tests/test_build.py checks its cache, tests/test_squashfs_boot.py that a
booted node used it)."""

from __future__ import annotations

from pathlib import Path

from sidusctl.image import apparmor


def _root(tmp: Path, *, parser: bool = True, profiles: bool = True,
          kernels: tuple[str, ...] = ("6.1.0-57-amd64",)) -> Path:
    root = tmp / "rootfs"
    (root / "boot").mkdir(parents=True)
    (root / "etc/apparmor.d/abstractions").mkdir(parents=True)
    if parser:
        (root / "sbin").mkdir()
        (root / "sbin/apparmor_parser").write_text("")
    if profiles:
        (root / "etc/apparmor.d/sbin.dhclient").write_text("profile x {}\n")
    for k in kernels:
        (root / f"boot/vmlinuz-{k}").write_text("")
    return root


def test_the_shipped_features_are_a_kernels_flattened_tree() -> None:
    text = (apparmor.FEATURES_DIR / "6.1.features").read_text()
    # apparmor_parser's flattened form of /sys/kernel/security/apparmor/features
    for key in ("caps {mask {", "domain {", "file {mask {", "policy {"):
        assert key in text


def test_a_known_kernel_gets_its_series_features(tmp_path: Path) -> None:
    root = _root(tmp_path, kernels=("6.1.0-57-amd64", "6.1.0-58-cloud-amd64"))
    p = apparmor.plan(root)
    assert p.why_not == ""
    assert p.features == {"6.1.0-57-amd64": apparmor.FEATURES_DIR / "6.1.features",
                          "6.1.0-58-cloud-amd64": apparmor.FEATURES_DIR / "6.1.features"}


def test_why_no_cache_is_made(tmp_path: Path) -> None:
    cases = {
        "no-parser": (dict(parser=False), "no AppArmor parser"),
        "no-profiles": (dict(profiles=False), "no profiles in /etc/apparmor.d"),
        "no-kernel": (dict(kernels=()), "has no kernel"),
        "other-series": (dict(kernels=("6.12.48-amd64",)),
                         "no AppArmor features known for kernel 6.12.48-amd64 (known series: "
                         "6.1)"),
    }
    for name, (kw, reason) in cases.items():
        p = apparmor.plan(_root(tmp_path / name, **kw))  # type: ignore[arg-type]
        assert p.features == {}, name
        assert reason in p.why_not, (name, p.why_not)


def test_series_of_a_release(tmp_path: Path) -> None:
    (tmp_path / "6.1.features").write_text("x")
    assert apparmor.features_for("6.1.0-57-amd64", tmp_path) == tmp_path / "6.1.features"
    assert apparmor.features_for("6.1-rc3", tmp_path) == tmp_path / "6.1.features"
    assert apparmor.features_for("6.10.2-amd64", tmp_path) is None
    assert apparmor.features_for("vmlinuz", tmp_path) is None
    assert apparmor.features_for("", tmp_path) is None
