"""Boot-loader trees: a TFTP root for pxelinux (BIOS), iPXE and GRUB (UEFI) from an inventory.

Layout written under the TFTP root::

    pxelinux.0 ldlinux.c32 menu.c32 libutil.c32   copied from the host's pxelinux/syslinux-common
    pxelinux.cfg/default                          menu with the SIDUS seed's tmpfs and iscsi labels
    pxelinux.cfg/01-<mac>  pxelinux.cfg/<HEXIP>   one per node (pxelinux tries these first)
    boot.ipxe  ipxe/<mac-with-dashes>.ipxe       iPXE: chain to the node's own script
    grubnetx64.efi                                GRUB for x86-64 UEFI, built by grub-mkimage
    ipxe.efi                                      iPXE for x86-64 UEFI (Debian package ipxe)
    grub/grub.cfg-01-<mac-with-dashes>            GRUB netboot (UEFI), per node
    boot/<image>/<generation>/vmlinuz-<image>     from the image store, by generation
    boot/<image>/<generation>/initrd.img-<image>  (vmlinuz-<image>, initrd.img-<image> when
                                                  the generation is not known)

Re-rendering writes only files whose content changed (each by temp file + rename), and removes
files a previous render wrote that are no longer wanted (listed in ``.sidusctl-pxe.json``, with
what ``grubnetx64.efi`` was built from: it is built again only when that changed).
One render at a time per tree: ``.sidusctl-pxe.lock`` (a :class:`FileLock`, removed by a render
that ends) is waited for; a render that finds the record of one killed holding it removes
that one's temp files (``.NAME.*tmp``) first.
Sources: syslinux wiki (PXELINUX config lookup), iPXE scripting docs, GRUB manual "Network".
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from sidusctl.core.errors import BusyError, ConfigError, PrerequisiteError, SidusError
from sidusctl.core.log import get_logger
from sidusctl.core.run import run, which
from sidusctl.core.state import (
    FileLock,
    atomic_copy,
    atomic_write_bytes,
    read_json,
    remove_left_files,
    write_json,
)
from sidusctl.netboot import secureboot
from sidusctl.netboot.inventory import Inventory, Node
from sidusctl.subsys.templates import render
from sidusctl.subsys.treecopy import file_sha256

log = get_logger("boot.pxe")

MANIFEST = ".sidusctl-pxe.json"
#: held while a render writes the tree (see the module doc)
LOCK = ".sidusctl-pxe.lock"
PXELINUX_DIRS = ("/usr/lib/PXELINUX",)
SYSLINUX_BIOS_DIRS = ("/usr/lib/syslinux/modules/bios",)
BIOS_FILES = {"pxelinux.0": PXELINUX_DIRS, "ldlinux.c32": SYSLINUX_BIOS_DIRS,
              "menu.c32": SYSLINUX_BIOS_DIRS, "libutil.c32": SYSLINUX_BIOS_DIRS}
NFS_OPTS = "rsize=8192,wsize=8192,tcp"  # the SIDUS seed's
#: GRUB's x86-64 UEFI modules (Debian package grub-efi-amd64-bin) and what goes into
#: grubnetx64.efi: network (efinet, tftp, http), Linux loading and a plain config language.
#: Its prefix is /grub on the server it was loaded from, where it looks for
#: grub.cfg-01-<mac>, then grub.cfg-<HEXIP>..., then grub.cfg (GRUB manual, "Network").
GRUB_EFI_DIR = Path("/usr/lib/grub/x86_64-efi")
#: iPXE's x86-64 UEFI build, the other boot file serve-pxe can give UEFI clients
#: (``--efi-loader ipxe``); it then runs boot.ipxe like any iPXE client.
IPXE_EFI_NAME = "ipxe.efi"
IPXE_EFI_DIRS = ("/usr/lib/ipxe",)
GRUB_EFI_NAME = "grubnetx64.efi"
#: where a generation's kernel and initrd go in the tree: ``boot/<image>/<generation>/``
BOOT_DIR = "boot"
GRUB_EFI_MODULES = ("efinet", "tftp", "http", "net", "linux", "normal", "configfile", "echo",
                    "test", "ls", "regexp", "all_video", "gzio", "efi_gop", "terminal",
                    "serial", "chain", "boot", "sleep")


@dataclass(frozen=True)
class SquashRef:
    """An image's squashfs export as nodes reach it: ``file`` (``gen-<stamp>.squashfs``, the
    generation), ``sha256`` (hex) and ``size`` (bytes) of the file, ``url`` (HTTP, for
    ``squashfs-http``) and ``nfs`` (``SERVER:/PATH/FILE``, for ``squashfs-nfs``; the
    directory is the NFS export), ``verity``: ``DATA_BLOCKS:ROOT_HASH:SALT`` of the hash tree
    the file ends with (:meth:`sidusctl.subsys.verity.VerityInfo.kernel_arg`), None for an
    export without one."""

    file: str
    sha256: str
    size: int
    url: str | None
    nfs: str | None
    verity: str | None = None

    @property
    def generation(self) -> str:
        """The generation, ``gen-<stamp>``: ``file`` without its ``.squashfs`` suffix."""
        return self.file.removesuffix(".squashfs")


@dataclass(frozen=True)
class ImageFiles:
    """Where an image's root is exported on the server and its kernel/initrd on this host;
    ``squashfs``: its squashfs export, when a node boots from one; ``generation``: the
    generation (``gen-<stamp>``) whose files these are, when known."""

    name: str
    kernel: Path
    initrd: Path
    export_path: str
    squashfs: SquashRef | None = None
    generation: str | None = None

    @property
    def kernel_rel(self) -> str:
        """The kernel's path in the tree: ``boot/<image>/<generation>/vmlinuz-<image>`` when
        the generation is known (a node that read its configuration just before a new
        generation was published still gets the kernel it names), else ``vmlinuz-<image>``."""
        return self._rel(f"vmlinuz-{self.name}")

    @property
    def initrd_rel(self) -> str:
        """The initrd's path in the tree, as :attr:`kernel_rel`'s (``initrd.img-<image>``)."""
        return self._rel(f"initrd.img-{self.name}")

    def _rel(self, file: str) -> str:
        return f"{BOOT_DIR}/{self.name}/{self.generation}/{file}" if self.generation else file


@dataclass
class RenderReport:
    """Files under the TFTP root, relative: ``created``, ``updated``, ``unchanged``, ``removed``."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        """The four lists by name: ``created``, ``updated``, ``unchanged``, ``removed`` (the lists
        themselves, not copies)."""
        return {"created": self.created, "updated": self.updated,
                "unchanged": self.unchanged, "removed": self.removed}


def nfsroot_arg(server: str, export_path: str) -> str:
    """The kernel's ``nfsroot=SERVER:PATH,OPTIONS`` parameter (the kernel's
    Documentation/admin-guide/nfs/nfsroot.rst, read by initramfs-tools' nfs script) with
    :data:`NFS_OPTS`."""
    return f"nfsroot={server}:{export_path},{NFS_OPTS}"


def overlay_args(node: Node, default_iscsi_ip: str) -> list[str]:
    """The sidus initramfs parameters for ``node``'s writable layer (see docs/netboot.md)."""
    args = [f"sidus.overlay={node.overlay}"]
    if node.size:
        args.append(f"sidus.size={node.size}")
    if node.overlay in ("disk", "iscsi") and node.disk:
        args.append(f"sidus.disk={node.disk}")
    if node.overlay == "iscsi":
        args.append(f"ISCSI_TARGET_IP={node.iscsi_target_ip or default_iscsi_ip}")
        args.append(f"sidus.iscsi.target={node.iscsi_target}")
        if node.iscsi_initiator:
            args.append(f"sidus.iscsi.initiator={node.iscsi_initiator}")
    if node.overlay == "nfs" and node.nfs_share:
        args.append(f"sidus.nfs={node.nfs_share}")
    if node.format and node.overlay in ("disk", "iscsi", "nfs"):
        args.append("sidus.format=1")
    return args


def root_args(node: Node, img: ImageFiles, server: str) -> list[str]:
    """The parameters naming ``node``'s lower layer (docs/netboot.md "Root sources"):
    ``root=/dev/nfs nfsroot=...`` for ``nfs`` (initramfs-tools' own NFS boot; with
    ``sidus.gen=`` naming the generation when the export path is that generation's, so that
    the node reports which one it runs and serve-pxe keeps it exported), and for the
    squashfs roots ``boot=sidus`` (the sidus boot script mounts the root) with
    ``sidus.root=``, ``sidus.src=`` (URL or ``SERVER:/PATH``), ``sidus.sha256=``,
    ``sidus.bytes=`` and, for ``squashfs-http`` from an export with a hash tree,
    ``sidus.verity=`` (the node's kernel then checks the blocks it reads instead of the
    whole file: initramfs/scripts/sidus). :class:`SidusError` if a squashfs root has no
    export (or no URL)."""
    if node.root == "nfs":
        gen = img.generation
        return ["root=/dev/nfs", nfsroot_arg(server, img.export_path), "ip=dhcp",
                *([f"sidus.gen={gen}"] if gen and f"/{gen}/" in img.export_path else [])]
    sq = img.squashfs
    src = None if sq is None else (sq.url if node.root == "squashfs-http" else sq.nfs)
    if sq is None or src is None:
        raise SidusError(f"node {node.name}: root {node.root} needs a squashfs export of image "
                         f"'{img.name}'" + (" served over HTTP" if sq is not None else ""),
                         hint=f"sidusctl pxe squashfs {img.name}")
    args = ["boot=sidus", "ip=dhcp", f"sidus.root={node.root}", f"sidus.src={src}",
            f"sidus.sha256={sq.sha256}", f"sidus.bytes={sq.size}"]
    if node.root == "squashfs-http" and sq.verity:
        args.append(f"sidus.verity={sq.verity}")
    return args


def node_cmdline(inv: Inventory, node: Node, img: ImageFiles, *,
                 initrd: Literal["path", "name", None] = "path",
                 report_url: str | None = None) -> str:
    """The kernel command line of ``node`` (without ``BOOTIF``, which pxelinux appends);
    ``initrd``: ``initrd=`` with the initrd's path in the tree (pxelinux loads it), with its
    file name (iPXE names the image it fetched by the URL's last component, and a kernel's
    EFI stub finds it by that name), or none (GRUB passes it itself); ``report_url``: where
    the node reports its boot stages (``sidus.report=``)."""
    server = str(inv.network.server)
    parts = []
    if initrd is not None:
        parts.append("initrd=" + (img.initrd_rel if initrd == "path"
                                  else PurePosixPath(img.initrd_rel).name))
    parts += root_args(node, img, server)
    if report_url:
        parts.append(f"sidus.report={report_url}")
    parts += overlay_args(node, inv.network.iscsi_target_ip or server)
    parts += list(node.kernel_args)
    return " ".join(parts)


def export_path_for(inv: Inventory, image: str, rootfs: Path) -> str:
    """Where the NFS server exports ``image``'s root: the inventory's ``nfs_root`` with
    ``{image}`` replaced, else ``rootfs`` itself (serve-pxe's own NFS export)."""
    if inv.network.nfs_root:
        return inv.network.nfs_root.replace("{image}", image)
    return str(rootfs)


# -- rendering (pure: returns {relative path: bytes}) -------------------------------------------

def render_tree(inv: Inventory, images: Mapping[str, ImageFiles], *,
                report_url: str | None = None) -> dict[str, str]:
    """Every config file of the tree, by path relative to the TFTP root (``report_url``: see
    :func:`node_cmdline`)."""
    server = str(inv.network.server)
    out: dict[str, str] = {}
    default = inv.default_image or (inv.nodes[0].image if inv.nodes else None)
    if default is not None:
        img = images[default]
        out["pxelinux.cfg/default"] = render(
            "pxelinux/default.j2", image=default, server=server,
            nfsroot=nfsroot_arg(server, img.export_path),
            kernel=img.kernel_rel, initrd=img.initrd_rel,
            iscsi_target_ip=inv.network.iscsi_target_ip or server,
            iscsi_target=inv.network.iscsi_target,
            extra=" ".join(inv.default_args))
    nodes_ctx = []
    for n in inv.nodes:
        img = images[n.image]
        ctx = {"node": n, "image": n.image, "kernel": img.kernel_rel, "initrd": img.initrd_rel,
               "cmdline": node_cmdline(inv, n, img, report_url=report_url),
               "cmdline_ipxe": node_cmdline(inv, n, img, initrd="name", report_url=report_url),
               "cmdline_noinitrd": node_cmdline(inv, n, img, initrd=None,
                                                report_url=report_url)}
        nodes_ctx.append(ctx)
        cfg = render("pxelinux/node.j2", **ctx)
        out[f"pxelinux.cfg/{n.pxelinux_name}"] = cfg
        out[f"pxelinux.cfg/{n.hex_ip}"] = cfg
        out[f"ipxe/{n.mac_dashes}.ipxe"] = render("ipxe/node.ipxe.j2", **ctx)
        out[f"grub/grub.cfg-{n.pxelinux_name}"] = render("grub/node.cfg.j2", **ctx)
    out["boot.ipxe"] = render("ipxe/boot.ipxe.j2", nodes=nodes_ctx)
    return out


def _first_file(name: str, dirs: Iterable[str]) -> Path | None:
    return next((Path(d) / name for d in dirs if (Path(d) / name).is_file()), None)


def _find(name: str, dirs: Iterable[str]) -> Path:
    p = _first_file(name, dirs)
    if p is not None:
        return p
    pkg = "pxelinux" if name == "pxelinux.0" else "syslinux-common"
    raise PrerequisiteError(f"{name} was not found in {', '.join(dirs)}",
                            hint=f"apt-get install {pkg}")


def _build_grub_efi(tftp_root: Path) -> Path | None:
    """``grubnetx64.efi`` built by ``grub-mkimage -O x86_64-efi -p /grub`` into a temporary
    file under ``tftp_root`` (the same modules give the same bytes, so a re-render leaves the
    tree's copy alone); None, with a warning, if GRUB's x86-64 EFI modules are not installed
    (UEFI machines then cannot boot from this tree). CommandError if grub-mkimage fails."""
    if not (GRUB_EFI_DIR / "moddep.lst").is_file():
        log.warning("%s missing (Debian package grub-efi-amd64-bin): no %s in the TFTP tree, "
                    "UEFI machines cannot boot from it", GRUB_EFI_DIR, GRUB_EFI_NAME)
        return None
    tmp = tftp_root / f".{GRUB_EFI_NAME}.build-tmp"
    try:
        run([which("grub-mkimage", "grub-common"), "-O", "x86_64-efi", "-d", str(GRUB_EFI_DIR),
             "-o", str(tmp), "-p", "/grub", *GRUB_EFI_MODULES], capture=True,
            what="grub-mkimage")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _grub_efi_key() -> str | None:
    """What :func:`_build_grub_efi`'s output depends on, as a SHA-256 (hex): grub-mkimage's
    and every module file's path, size and mtime (a package upgrade changes them), the module
    list and the prefix; None when grub-mkimage or the modules are missing. A render that
    finds the key it recorded and the tree's file as it left it skips grub-mkimage: a render
    that changes nothing then writes nothing (so it also runs on a full disk)."""
    try:
        mkimage = Path(which("grub-mkimage", "grub-common"))
        parts = [f"{mkimage.resolve()}:{_stat_key(mkimage)}", "-p /grub", *GRUB_EFI_MODULES]
        parts += sorted(f"{p.name}:{_stat_key(p)}" for p in GRUB_EFI_DIR.iterdir()
                        if p.is_file())
    except (OSError, PrerequisiteError):
        return None
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _stat_key(p: Path) -> str:
    st = p.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _same_file(src: Path, dest: Path) -> bool:
    try:
        if src.stat().st_size != dest.stat().st_size:
            return False
    except FileNotFoundError:
        return False
    return file_sha256(src) == file_sha256(dest)


def _copy_atomic(src: Path, dest: Path) -> None:
    atomic_copy(src, dest, mode=0o644)


def write_tree(
    tftp_root: Path,
    inv: Inventory,
    images: Mapping[str, ImageFiles],
    *,
    bios_dirs: Mapping[str, Iterable[str]] | None = None,
    progress: Callable[[str], None] | None = None,
    report_url: str | None = None,
    shim: bool = False,
    signed_grub: Path | None = None,
    retain_boot: bool = False,
) -> RenderReport:
    """Render ``inv`` into ``tftp_root`` (created if missing). Only changed files are rewritten,
    each atomically; files of an earlier render that are no longer wanted are removed, except,
    with ``retain_boot``, the kernels and initrds of earlier generations (``boot/``: serve-pxe
    removes them with :func:`prune_boot` once no node holds them).
    Raises :class:`PrerequisiteError` if pxelinux/syslinux files are missing, :class:`SidusError`
    if an image lacks its kernel or initrd. Debian's signed chain (shim, MokManager, signed
    GRUB and its grub.cfg: :mod:`sidusctl.netboot.secureboot`) is placed when the host has it;
    ``shim``: it must be there (:class:`PrerequisiteError` naming the missing packages);
    ``signed_grub``: the signed GRUB to place instead of the host package's
    (:func:`sidusctl.netboot.secureboot.chain`; :class:`ConfigError` if it is no EFI binary).
    :class:`ConfigError` naming ``tftp_root`` if it cannot be made a directory;
    :class:`StateError` if the tree's lock file cannot be opened. Waits while another render
    writes the same tree."""
    missing = [n for n in inv.images() if n not in images]
    if missing:
        raise SidusError(f"no kernel/initrd known for image(s): {', '.join(missing)}")
    for img in (images[n] for n in inv.images()):
        for p in (img.kernel, img.initrd):
            if not p.is_file():
                raise SidusError(f"image '{img.name}' has no {p.name} ({p})",
                                 hint=f"rebuild it with netboot enabled: sidusctl build {img.name}")
    if signed_grub is not None:
        secureboot.check_signed_grub(signed_grub)
    make_root(tftp_root)
    # two renders at once shared grub-mkimage's temp file and atomic_copy's (one deleted the
    # other's: exit 70) and each removed files the other's inventory wanted
    lock = FileLock(tftp_root / LOCK, f"the TFTP tree {tftp_root}", remove=True)
    lock.acquire(wait=True)
    try:
        if lock.left_behind is not None:
            _remove_temp_files(tftp_root)
        return _write_tree_locked(tftp_root, inv, images, bios_dirs=bios_dirs,
                                  progress=progress, report_url=report_url, shim=shim,
                                  signed_grub=signed_grub, retain_boot=retain_boot)
    finally:
        lock.release()


def prune_boot(tftp_root: Path, keep: Mapping[str, Collection[str]]) -> list[str]:
    """Remove the kernel and initrd directories ``boot/<image>/<generation>/`` of the
    generations ``keep`` (by image) does not name; what was removed (``image/generation``).
    Skipped (returns []) while a render writes the tree: its lock is the render's."""
    root = tftp_root / BOOT_DIR
    if not root.is_dir():
        return []
    lock = FileLock(tftp_root / LOCK, f"the TFTP tree {tftp_root}", remove=True)
    try:
        lock.acquire()
    except BusyError:
        return []
    out = []
    try:
        for image_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for gen in sorted(p for p in image_dir.iterdir() if p.is_dir()):
                if gen.name in keep.get(image_dir.name, ()):
                    continue
                shutil.rmtree(gen, ignore_errors=True)
                out.append(f"{image_dir.name}/{gen.name}")
            with contextlib.suppress(OSError):
                image_dir.rmdir()  # once empty
    finally:
        lock.release()
    return out


def make_root(tftp_root: Path) -> None:
    """Make ``tftp_root`` a directory (its parents too) if it is not one;
    :class:`ConfigError` naming it if it cannot be."""
    try:
        tftp_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(str(tftp_root), None, f"cannot create the TFTP root: {e.strerror}",
                          expected="a directory, or a path where one can be made") from None


def _remove_temp_files(tftp_root: Path) -> None:
    """Remove the temp files a render killed while writing ``tftp_root`` left: ``.NAME.tmp``,
    ``.NAME.XXXXXXXX.tmp`` (:func:`atomic_copy`, :func:`atomic_write_bytes`) and grub-mkimage's
    ``.grubnetx64.efi.build-tmp``, in the root and the directories a render writes."""
    dirs = [tftp_root, *(tftp_root / s for s in ("pxelinux.cfg", "ipxe", "grub",
                                                  "grub/x86_64-efi"))]
    remove_left_files(dirs, ".*tmp", "a render")


def _write_tree_locked(
    tftp_root: Path,
    inv: Inventory,
    images: Mapping[str, ImageFiles],
    *,
    bios_dirs: Mapping[str, Iterable[str]] | None,
    progress: Callable[[str], None] | None,
    report_url: str | None,
    shim: bool,
    signed_grub: Path | None,
    retain_boot: bool,
) -> RenderReport:
    """:func:`write_tree` once the tree's lock is held."""
    report = RenderReport()
    wanted: set[str] = set()

    def note(rel: str, changed: bool, existed: bool) -> None:
        wanted.add(rel)
        if not changed:
            report.unchanged.append(rel)
        elif existed:
            report.updated.append(rel)
        else:
            report.created.append(rel)
        if changed and progress:
            progress(rel)

    manifest = tftp_root / MANIFEST
    prev: object = None
    if manifest.exists():
        with contextlib.suppress(Exception):
            prev = read_json(manifest)
    prev = prev if isinstance(prev, dict) else {}
    previous = [str(p) for p in prev.get("files", [])] if isinstance(prev.get("files"), list) \
        else []
    sources = bios_dirs or BIOS_FILES
    copies: dict[str, Path] = {name: _find(name, dirs) for name, dirs in sources.items()}
    for name in inv.images():
        copies[images[name].kernel_rel] = images[name].kernel
        copies[images[name].initrd_rel] = images[name].initrd
    grub_key = _grub_efi_key()
    grub_was = prev.get("grub_efi")
    grub_record: dict[str, str] | None = None
    efi: Path | None = None
    with contextlib.suppress(OSError):
        if (grub_key is not None and isinstance(grub_was, dict)
                and grub_was.get("key") == grub_key
                and grub_was.get("file") == _stat_key(tftp_root / GRUB_EFI_NAME)):
            grub_record = grub_was  # built from the same inputs, the tree's copy untouched
            note(GRUB_EFI_NAME, False, True)
    if grub_record is None:
        efi = _build_grub_efi(tftp_root)
    if efi is not None:
        copies[GRUB_EFI_NAME] = efi
    ipxe_efi = _first_file(IPXE_EFI_NAME, IPXE_EFI_DIRS)
    if ipxe_efi is not None:
        copies[IPXE_EFI_NAME] = ipxe_efi
    else:
        log.debug("no %s in %s (Debian package ipxe): UEFI clients can get GRUB only",
                  IPXE_EFI_NAME, ", ".join(IPXE_EFI_DIRS))
    signed = secureboot.chain_files(required=shim, chain=secureboot.chain(signed_grub))
    copies.update(signed)
    try:
        for rel, src in sorted(copies.items()):
            dest = tftp_root / rel
            existed = dest.exists()
            same = existed and _same_file(src, dest)
            if not same:
                _copy_atomic(src, dest)
            note(rel, not same, existed)
        if efi is not None and grub_key is not None:
            grub_record = {"key": grub_key, "file": _stat_key(tftp_root / GRUB_EFI_NAME)}
    finally:
        if efi is not None:
            efi.unlink(missing_ok=True)
    texts = render_tree(inv, images, report_url=report_url)
    if signed:
        texts.update(secureboot.tree_files(inv))
    for rel, text in sorted(texts.items()):
        dest = tftp_root / rel
        data = text.encode()
        existed = dest.exists()
        same = existed and dest.read_bytes() == data
        if not same:
            atomic_write_bytes(dest, data, mode=0o644)
        note(rel, not same, existed)
    for rel in sorted(set(previous) - wanted):
        p = tftp_root / rel
        if ".." in Path(rel).parts:
            continue
        if retain_boot and rel.startswith(f"{BOOT_DIR}/"):
            if p.is_file():  # an earlier generation's: prune_boot removes it once not held
                wanted.add(rel)
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            report.removed.append(rel)
    record: dict[str, object] = {"files": sorted(wanted)}
    if grub_record is not None:
        record["grub_efi"] = grub_record
    if sorted(previous) != sorted(wanted) or grub_record != grub_was:
        write_json(manifest, record)
    return report
