"""Values on the command line and in files that the real CLI once took with an internal error,
or quietly, and now refuses with exit 2 (4 for a recipe it cannot find) before anything is
written or bound: ports out of range, a lease time below a minute, a DNS upstream or a domain
that is not one, a recipe folder whose name is no image name, and a boot server at its subnet's
broadcast address. Each case was found by probing the CLI (session 43)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import sidusctl

INVENTORY = ('[network]\nsubnet = "10.0.0.0/24"\nserver = "{server}"\n\n'
             '[[nodes]]\nname = "n1"\nmac = "52:54:00:00:00:01"\nip = "10.0.0.5"\n'
             'image = "minimal"\n')


def _refused(tmp_path: Path, *args: str, code: int = 2, expect: tuple[str, ...]) -> None:
    """Run ``sidusctl ARGS`` with an empty state directory: exit ``code``, every ``expect`` in
    stderr, no traceback, and the state directory still empty."""
    state = tmp_path / "sdt-state"
    state.mkdir()
    res = sidusctl(*args, state=state, timeout=60)
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    for e in expect:
        assert e in res.stderr, (e, res.stderr)
    assert list(state.iterdir()) == []


def _inventory(tmp_path: Path, server: str = "10.0.0.1") -> str:
    f = tmp_path / "nodes.toml"
    f.write_text(INVENTORY.format(server=server))
    return str(f)


def _recipe(tmp_path: Path, folder: str, text: str) -> Path:
    """A recipe folder ``folder`` whose image.toml holds ``text``."""
    d = tmp_path / folder
    d.mkdir()
    (d / "image.toml").write_text(text)
    return d


def test_a_recipe_name_too_long_for_the_file_system_is_not_found(tmp_path: Path) -> None:
    _refused(tmp_path, "build", "--check", "a" * 300, code=4, expect=("no image recipe",))


def test_a_recipe_folder_whose_name_is_no_image_name_is_refused_by_check(
        tmp_path: Path) -> None:
    d = _recipe(tmp_path, "we ird", 'suite = "bookworm"\n')
    _refused(tmp_path, "build", "--check", str(d),
             expect=(f"{d / 'image.toml'}: the image name 'we ird' (the recipe's folder name) "
                     "is not a valid image name",))


@pytest.mark.parametrize(("args", "expect"), [
    (("--http", "--http-port", "70000"), "'--http-port': 70000 is not in the range"),
    (("--http", "--http-port", "0"), "'--http-port': 0 is not in the range"),
    (("--lease-time", "-5"), "'--lease-time': -5 is not in the range 60<="),
    (("--dns-upstream", "1.2.3.4:99999"), "'--dns-upstream': '1.2.3.4:99999' is not"),
    (("--dns-upstream", "nowhere"), "'--dns-upstream': 'nowhere' is not"),
])
def test_serve_pxe_refuses_bad_options_before_writing_its_tree(
        tmp_path: Path, args: tuple[str, ...], expect: str) -> None:
    _refused(tmp_path, "serve-pxe", "--nodes", _inventory(tmp_path), "-i", "sdt-none",
             "--nfs", "off", *args, expect=(expect,))


@pytest.mark.parametrize(("args", "expect"), [
    (("--domain", "-bad-"), "command line: key 'domain': '-bad-' (expected a domain"),
    (("--domain", "a..b", "--no-dns"), "command line: key 'domain': 'a..b' (expected"),
    (("--dns-upstream", "10.0.0.9:0", "--domain", "c.test"), "'--dns-upstream': '10.0.0.9:0'"),
    (("--lease-time", "59"), "'--lease-time': 59 is not in the range"),
])
def test_serve_run_refuses_bad_values_before_binding(
        tmp_path: Path, args: tuple[str, ...], expect: str) -> None:
    _refused(tmp_path, "serve", "run", "-i", "sdt-none", "--server-ip", "10.0.0.1",
             "--subnet", "10.0.0.0/24", *args, expect=(expect,))


def test_pxe_export_refuses_an_http_base_with_a_port_out_of_range(tmp_path: Path) -> None:
    _refused(tmp_path, "pxe", "export", "--nodes", _inventory(tmp_path), "--format",
             "dnsmasq", "--http-base", "http://10.0.0.1:70000",
             expect=("--http-base: 'http://10.0.0.1:70000", "port in 1-65535"))


@pytest.mark.parametrize(("server", "kind"), [("10.0.0.255", "broadcast"),
                                               ("10.0.0.0", "network")])
def test_an_inventory_server_at_the_subnets_network_or_broadcast_address_is_refused(
        tmp_path: Path, server: str, kind: str) -> None:
    f = _inventory(tmp_path, server)
    _refused(tmp_path, "pxe", "check", "--nodes", f,
             expect=(f"{f}:3: key 'network.server': {server} is the {kind} address of "
                     "10.0.0.0/24",))


def test_inventory_messages_name_what_is_expected_and_blame_no_node_for_a_bad_default(
        tmp_path: Path) -> None:
    f = tmp_path / "nodes.toml"
    f.write_text('[network]\nsubnet = 5\nserver = "10.0.0.1"\n\n'
                 '[defaults]\nimage = "minimal"\noverlay = "ramdisk"\n\n'
                 '[[nodes]]\nname = "n1"\nmac = "52:54:00:00:00:01"\nip = 167772165\n')
    state = tmp_path / "sdt-state"
    state.mkdir()
    res = sidusctl("pxe", "check", "--nodes", str(f), state=state, timeout=60)
    assert res.returncode == 2, res.stderr
    assert f"{f}:2: key 'network.subnet': found int 5 (expected an IPv4 network" in res.stderr
    assert f"{f}:7: key 'defaults.overlay': found 'ramdisk'" in res.stderr
    assert (f"{f}:12: key 'nodes.n1.ip': found int 167772165 (expected an IPv4 address such "
            "as") in res.stderr
    # the good key of [defaults] still applies: the node has its image
    assert "no image for this node" not in res.stderr, res.stderr
    assert "Input should be" not in res.stderr and "Traceback" not in res.stderr


def test_an_unknown_key_in_an_optional_table_lists_the_keys_it_may_have(tmp_path: Path) -> None:
    d = _recipe(tmp_path, "kb", 'suite = "bookworm"\n[keyboard]\nfoo = 1\n')
    _refused(tmp_path, "build", "--check", str(d),
             expect=(f"{d / 'image.toml'}:3: key 'keyboard.foo': unknown key (expected one of "
                     "layout, model, variant, options)",))


def test_toml_left_open_at_the_end_of_the_file_is_reported_at_its_last_line(
        tmp_path: Path) -> None:
    f = tmp_path / "image.toml"
    f.write_text('suite = "bookworm"\ninclude = ["a",\n')
    _refused(tmp_path, "build", "--check", str(f),
             expect=(f"{f}:2: not valid TOML: Invalid value (at end of document)",))


@pytest.mark.parametrize("epoch", ["garbage", "99999999999999999"])
def test_man_refuses_a_source_date_epoch_that_is_no_date_before_writing(
        tmp_path: Path, epoch: str) -> None:
    out = tmp_path / "man"
    res = sidusctl("man", "--out", str(out), timeout=60, env={"SOURCE_DATE_EPOCH": epoch})
    assert res.returncode == 2, res.stderr
    assert f"$SOURCE_DATE_EPOCH: found '{epoch}' (expected seconds since" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_man_names_an_out_directory_it_cannot_make(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    res = sidusctl("man", "--out", str(tmp_path / "afile" / "sub"), timeout=60)
    assert res.returncode == 2, res.stderr
    assert "--out: cannot write the pages to" in res.stderr and "Not a directory" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_deb_cache_that_cannot_be_a_directory_is_named(tmp_path: Path) -> None:
    from sidusctl.core.errors import ConfigError
    from sidusctl.image.common import make_cache

    (tmp_path / "afile").write_text("")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ConfigError, match=r"cannot be the \.deb cache: .*--cache-dir or "
                                              r"\$SIDUSCTL_CACHE"):
            make_cache(bad)
    assert make_cache(tmp_path / "a" / "b").is_dir()


def test_image_rm_names_every_bad_or_unknown_image_and_removes_none(tmp_path: Path) -> None:
    state = tmp_path / "sdt-state"
    (state / "images" / "good" / "gen-1").mkdir(parents=True)
    (state / "images" / "good" / "current").symlink_to("gen-1")
    res = sidusctl("image", "rm", "good", "Foo", "b/x", state=state, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "invalid name 'Foo'" in res.stderr and "invalid name 'b/x'" in res.stderr
    res = sidusctl("image", "rm", "good", "nope", "nope2", state=state, timeout=60)
    assert res.returncode == 4, res.stderr
    assert "no image named 'nope'" in res.stderr and "no image named 'nope2'" in res.stderr
    assert "Traceback" not in res.stderr
    assert (state / "images" / "good" / "current").is_dir()



def test_image_rm_refuses_an_image_running_nodes_hold_unless_forced(tmp_path: Path) -> None:
    """A generation serve-pxe holds for the nodes that booted it (their root is still
    served) is not deleted from under them: exit 5 naming the image and the generation,
    nothing removed, not even the other images named; ``--force`` deletes it. An expired
    hold does not count. An image removed takes its squashfs exports with it (nothing
    else would remove them); a refused one keeps them."""
    import time

    from sidusctl.netboot import squash
    from sidusctl.subsys.imagestore import ImageStore

    state = tmp_path / "sdt-state"
    store = ImageStore(state, recover=False)
    for name in ("held", "free", "stale"):
        with store.new_generation(name) as gen:
            (gen.rootfs / "etc").mkdir(parents=True)
            gen.write_manifest({"name": name, "kind": "test"})
    gen_held = store.get("held").dir.name
    for name in ("held", "free"):
        squash.export(state, name, level=1)
    exports = state / "netboot" / "squashfs"
    assert {p.name for p in exports.iterdir()} == {"held", "free"}
    store.set_holds("held", "serve-pxe", {gen_held: time.time() + 600})
    store.set_holds("stale", "serve-pxe", {store.get("stale").dir.name: time.time() - 1})
    # a hold of a generation already gone protects nothing
    store.set_holds("free", "serve-pxe", {"gen-19700101T000000-1": time.time() + 600})
    res = sidusctl("image", "rm", "free", "held", "stale", state=state, timeout=60)
    assert res.returncode == 5, res.stderr
    assert f"image 'held' is held for nodes that booted it or were just told to ({gen_held})" \
        in res.stderr
    assert "image rm --force" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.count("hint:") == 1, res.stderr
    assert {p.name for p in (state / "images").iterdir()} == {"held", "free", "stale"}
    assert {p.name for p in exports.iterdir()} == {"held", "free"}
    res = sidusctl("image", "rm", "free", "stale", state=state, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "removed image 'free' and its squashfs exports (gen-" in res.stdout + res.stderr
    assert {p.name for p in exports.iterdir()} == {"held"}
    res = sidusctl("image", "rm", "--force", "held", state=state, timeout=60)
    assert res.returncode == 0, res.stderr
    assert list((state / "images").iterdir()) == []
    assert list(exports.iterdir()) == []

def test_vnode_commands_on_several_unknown_vnodes_exit_not_found(tmp_path: Path) -> None:
    res = sidusctl("vnode", "destroy", "sdt-a", "sdt-b", state=tmp_path / "st", timeout=60)
    assert res.returncode == 4, res.stderr
    assert "no vnode named 'sdt-a'" in res.stderr and "no vnode named 'sdt-b'" in res.stderr
