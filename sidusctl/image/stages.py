"""The stages that run inside the chroot session, in two groups.

The package stage (:meth:`Configurer.packages`): apt sources, exclusion pins, apt-get update,
full-upgrade, the recipe's packages, purges, superseded kernels. Its result is what the stage
cache keeps (:func:`package_inputs` lists everything that decides it).

The later stages (:meth:`Configurer.later`): locales, timezone, keyboard, site files, tricks,
root password, the netboot hook, the AppArmor policy cache (:mod:`sidusctl.image.apparmor`),
and the initramfs, regenerated only when its inputs (kernel,
hook, initramfs configuration: :func:`initrd_key`) differ from those of the image's current
generation, whose initrd is otherwise reused. They always run, on a root fresh from the
package stage (built now or restored from the cache), so an incremental build and a clean one
make the same tree.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import shutil
import stat
from pathlib import Path

from sidusctl.core.errors import BuildError, CommandError
from sidusctl.core.log import get_logger
from sidusctl.core.run import run
from sidusctl.core.state import atomic_write_bytes
from sidusctl.image import apparmor
from sidusctl.image.common import (
    APT,
    Reporter,
    explain,
    mirror_from,
    package_list,
    shared_cache_turn,
)
from sidusctl.image.recipe import Recipe
from sidusctl.image.sources import sources_list
from sidusctl.subsys.chroot import ChrootSession
from sidusctl.subsys.imagestore import Image
from sidusctl.subsys.manifest import StageRecord
from sidusctl.subsys.templates import render_file
from sidusctl.subsys.treecopy import file_sha256

log = get_logger("build")

# Bump when the code of a stage group changes what it makes: cached results of an older
# version are then not used.
PACKAGE_STAGE_VERSION = "1"
#: where the postinst scripts find the recipe's folder inside the root (a copy, removed after)
RECIPE_IN_ROOT = "/run/sidusctl/recipe"
INITRD_STAGE_VERSION = "1"

# What update-initramfs reads from the root besides the kernel and its modules (initramfs-tools'
# hooks: kmod, udev, fsck, resume, keymap, busybox, and our netboot hook under
# etc/initramfs-tools); a site file written there makes the initrd be regenerated.
INITRD_INPUTS = ("etc/initramfs-tools", "usr/share/initramfs-tools", "etc/modprobe.d",
                 "usr/lib/modprobe.d", "etc/modules", "etc/udev", "etc/default/keyboard",
                 "etc/console-setup", "etc/crypttab", "etc/fstab", "etc/ld.so.conf",
                 "etc/ld.so.conf.d", "etc/ld.so.cache", "etc/mdadm", "etc/lvm", "etc/kernel-img.conf",
                 "etc/mke2fs.conf", "etc/default/busybox")


def effective_packages(r: Recipe) -> list[str]:
    """The recipe's packages plus those its later settings need (locales, keyboard)."""
    packages = list(r.packages)
    if r.locales and not set(r.locales) <= {"C.UTF-8"} and "locales" not in packages:
        packages.append("locales")
    if r.keyboard is not None and "keyboard-configuration" not in packages:
        packages.append("keyboard-configuration")
    return packages


def package_inputs(r: Recipe, backend: str, mirror: str, security: str,
                   releases: dict[str, str]) -> dict[str, object]:
    """Everything that decides the root after the package stage (bootstrap included), by name:
    the stage cache's key is a digest of it, and a miss is explained by comparing it with the
    current generation's. ``releases``: suite → sha256 of its InRelease (suite, -updates,
    -security)."""
    return {"suite": r.suite, "arch": r.arch, "variant": r.variant,
            "components": list(r.components), "mirror": mirror, "security": security,
            "include": list(r.include), "exclude": list(r.exclude),
            "packages": effective_packages(r), "install_recommends": r.install_recommends,
            "install_suggests": r.install_suggests, "upgrade": r.upgrade, "purge": list(r.purge),
            "backend": backend, "releases": dict(sorted(releases.items())),
            "stage_version": PACKAGE_STAGE_VERSION}


def release_suites(r: Recipe, security: str) -> list[tuple[str, str]]:
    """(which archive: ``mirror`` or ``security``, suite) of every InRelease the package stage
    reads: the suite, and (as :func:`sources_list` writes them) -updates and -security."""
    out = [("mirror", r.suite)]
    if r.suite not in ("sid", "unstable", "experimental"):
        out.append(("mirror", f"{r.suite}-updates"))
        if security and r.suite != "testing":
            out.append(("security", f"{r.suite}-security"))
    return out


def _digest_paths(root: Path, rels: tuple[str, ...]) -> str:
    """sha256 over the names, modes, owners, link targets and contents below ``rels``."""
    h = hashlib.sha256()
    for rel in rels:
        base = root / rel
        paths = [base] if not base.is_dir() or base.is_symlink() else \
            [base, *sorted(base.rglob("*"))]
        for p in paths:
            if not p.exists() and not p.is_symlink():
                h.update(f"{rel}: absent\n".encode())
                continue
            st = p.lstat()
            h.update(f"{p.relative_to(root)} {st.st_mode:o} {st.st_uid} {st.st_gid}\n".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(file_sha256(p).encode())
    return h.hexdigest()


def initrd_key(root: Path, r: Recipe, package_key: str | None) -> str | None:
    """What decides the initrd: the package stage (kernel, modules, initramfs-tools), the
    kernels in /boot, the netboot setting and every initramfs input file of the root
    (:data:`INITRD_INPUTS`, the installed netboot hook and its configuration included). None
    without a package key (nothing to compare with)."""
    if package_key is None:
        return None
    h = hashlib.sha256(f"{INITRD_STAGE_VERSION}\n{package_key}\n{r.netboot.enabled}\n".encode())
    for k in sorted((root / "boot").glob("vmlinuz-*")):
        h.update(f"{k.name} {file_sha256(k)}\n".encode())
    mods = root / "usr/lib/modules"
    h.update(" ".join(sorted(p.name for p in mods.iterdir()) if mods.is_dir() else []).encode())
    h.update(_digest_paths(root, INITRD_INPUTS).encode())
    return h.hexdigest()[:32]


class Configurer:
    """Runs the stages of ``recipe`` in a chroot session. ``purged``: what the package stage
    purged; ``records``: one :class:`StageRecord` per later stage, in order."""

    def __init__(self, recipe: Recipe, rep: Reporter, mirror: str, security: str) -> None:
        self.recipe = recipe
        self.rep = rep
        self.mirror = mirror
        self.security = security
        self.purged: list[str] = []
        self.records: list[StageRecord] = []

    # -- the package stage --------------------------------------------------------------------
    def packages(self, s: ChrootSession, refresh: bool = True) -> None:
        """Sources, pins, update, upgrade, install, purge. ``refresh=False`` (a delta on a
        root whose package lists come from the same InRelease files, which the stage cache key
        guarantees) skips the update and the upgrade: both would find nothing new. Raises
        BuildError (a package that does not exist, an excluded package pulled in, the mirror
        down, a full disk)."""
        r = self.recipe
        root = s.root
        # sources: what debootstrap chose, extended with updates/security and the components
        mirror = self.mirror or mirror_from(root) or ""
        if mirror:
            (root / "etc/apt/sources.list").write_text(
                sources_list(mirror, self.security, r.suite, r.components))
        if r.exclude:
            _write_pins(root, r.exclude)
        packages = effective_packages(r)
        with shared_cache_turn(s.apt_cache, self.rep):
            self._install(s, packages, mirror, refresh)
        excluded_present = sorted(set(r.exclude) & set(package_list(root)))
        if excluded_present:
            raise BuildError(f"{r.path}: key 'exclude': {', '.join(excluded_present)} got installed "
                             "all the same (a required package or a hard dependency of an included one)")

    def _install(self, s: ChrootSession, packages: list[str], mirror: str,
                 refresh: bool = True) -> None:
        r = self.recipe
        root = s.root
        apt = APT
        try:
            if refresh and (packages or r.upgrade or r.purge):
                self.rep.line("apt-get update")
                s.run([*apt, "update"], on_line=None, what="apt-get update")
            if refresh and r.upgrade:
                self.rep.line("apt-get full-upgrade")
                s.run([*apt, "full-upgrade"], what="apt-get full-upgrade", on_line=self._apt_line,
                      tail_lines=60)
            if packages:
                self.check_packages(s, packages)
                self.rep.line(f"installing {len(packages)} package(s)")
                flags = ["--install-recommends" if r.install_recommends else "--no-install-recommends"]
                if r.install_suggests:
                    flags.append("--install-suggests")
                s.run([*apt, *flags, "install", *packages], what="apt-get install",
                      on_line=self._apt_line, tail_lines=60)
            if r.purge:
                self._purge(s, apt)
            self._prune_old_kernels(s, apt)
        except CommandError as e:
            raise explain(e, r, mirror, root, "package installation") from e

    def _apt_line(self, line: str) -> None:
        if line.startswith(("Unpacking ", "Setting up ", "Get:", "Removing ", "Purging ")):
            self.rep.line(line)

    def check_packages(self, s: ChrootSession, packages: list[str]) -> None:
        """One message listing every package apt does not know, before installing any."""
        res = s.run(["apt-cache", "policy", *packages], capture=True, what="apt-cache policy")
        known = set(re.findall(r"^(\S+):\s*$", res.stdout, re.M))
        known |= {k.split(":")[0] for k in known}
        missing = []
        for p in packages:
            if p in known:
                # "Candidate: (none)" means known but not installable (virtual, or wrong arch)
                block = res.stdout.split(f"{p}:\n", 1)[1].split("\n", 3)[:3]
                if any("Candidate: (none)" in b for b in block):
                    missing.append(p)
            else:
                missing.append(p)
        if missing:
            raise BuildError(
                f"{self.recipe.path}: key 'packages': not found in {self.recipe.suite} "
                f"({' '.join(self.recipe.components)}): {', '.join(missing)}",
                hint="check the names with apt-cache search, or add a component (contrib, non-free)")

    def _purge(self, s: ChrootSession, apt: list[str]) -> None:
        installed = package_list(s.root)
        targets = sorted({p for p in installed for pat in self.recipe.purge
                          if fnmatch.fnmatchcase(p, pat)})
        if targets:
            self.rep.line(f"purging {', '.join(targets)}")
            s.run([*apt, "purge", *targets], what="apt-get purge")
            s.run([*apt, "autoremove", "--purge"], what="apt-get autoremove")
        self.purged = targets

    def _prune_old_kernels(self, s: ChrootSession, apt: list[str]) -> None:
        """An upgrade from -security can bring a new kernel ABI (a new linux-image-X package)
        next to the one debootstrap installed; keep only those a linux-image-* metapackage
        depends on (a netboot image serves one kernel)."""
        installed = package_list(s.root)
        metas = [p for p in installed if re.fullmatch(r"linux-image-[a-z][a-z0-9-]*", p)
                 and not re.match(r"linux-image-\d", p)]
        if not metas:
            return
        res = run(["dpkg-query", f"--admindir={s.root}/var/lib/dpkg", "-W", "-f", "${Depends}\n",
                   *metas], capture=True, what="dpkg-query")
        wanted = set(re.findall(r"(linux-image-\d[^\s,(]*)", res.stdout))
        old = sorted(p for p in installed if re.match(r"linux-image-\d", p) and p not in wanted)
        if wanted and old:
            self.rep.line(f"removing superseded kernel(s) {', '.join(old)}")
            s.run([*apt, "purge", *old], what="apt-get purge (old kernels)")

    # -- the later stages ---------------------------------------------------------------------
    def later(self, s: ChrootSession, package_key: str | None, prev: Image | None) -> None:
        """Locales ... initramfs on the root fresh from the package stage; ``prev``: the image's
        current generation, whose initrd is reused when :func:`initrd_key` matches."""
        r = self.recipe
        root = s.root
        self._step("locales", bool(r.locales), lambda: self._locales(s), "the recipe sets none")
        self._step("timezone", bool(r.timezone), lambda: self._timezone(s), "the recipe sets none")
        self._step("keyboard", r.keyboard is not None, lambda: self._keyboard(root),
                   "the recipe sets none")
        self._step("files", bool(r.files), lambda: self._files(root), "the recipe has none")
        self._step("tricks", True, lambda: self._tricks(root), "")
        self._step("postinst", bool(r.postinst), lambda: self._postinst(s),
                   "the recipe has no postinst scripts")
        self._step("root-password", bool(r.root_password), lambda: self._root_password(s, prev),
                   "the recipe sets none")
        self._step("netboot-hook", r.netboot.enabled, lambda: self._netboot_hook(root),
                   "netboot is off in the recipe")
        # last of the steps that may change a profile: a profile newer than its cache would
        # be compiled again at boot
        aa = apparmor.plan(root)
        self._step("apparmor-cache", bool(aa.features), lambda: self._apparmor_cache(s, aa),
                   aa.why_not)
        if not ((root / "usr/sbin/update-initramfs").exists()
                and list((root / "boot").glob("vmlinuz-*"))):
            self.records.append(StageRecord(name="initramfs", action="skipped",
                                            reason="no kernel or no initramfs-tools in the image"))
            return
        self._initramfs(s, package_key, prev)

    def _apparmor_cache(self, s: ChrootSession, aa: apparmor.CachePlan) -> None:
        made, failed = apparmor.compile_cache(s, aa)
        kernels = ", ".join(aa.features)
        for d in made:
            self.rep.line(f"AppArmor policy cache /{d} (kernel {kernels})")
        for f in failed:
            log.warning("AppArmor policy cache: apparmor_parser could not compile every "
                        "profile, its nodes will meet the same error at boot: %s", f)

    def _root_password(self, s: ChrootSession, prev: Image | None) -> None:
        """chpasswd; but when the current generation's root hash is of the same password, that
        hash is kept (``chpasswd -e``): chpasswd salts at random, and an unchanged recipe should
        give an unchanged tree (and so a reusable tarball)."""
        pw = self.recipe.root_password
        old = _root_hash(prev.rootfs) if prev is not None else None
        if old and _same_password(pw, old):
            # chpasswd -e writes etc/shadow- (a backup), which chpasswd through PAM does not:
            # put it back as it was, so that the tree is the clean build's
            backup = s.root / "etc/shadow-"
            kept = (backup.read_bytes(), backup.stat()) if backup.is_file() else None
            s.run(["chpasswd", "-e"], input=f"root:{old}\n".encode(), what="chpasswd -e")
            if kept is None:
                backup.unlink(missing_ok=True)
            else:
                atomic_write_bytes(backup, kept[0], mode=stat.S_IMODE(kept[1].st_mode))
                os.chown(backup, kept[1].st_uid, kept[1].st_gid)
            return
        s.run(["chpasswd"], input=f"root:{pw}\n".encode(), what="chpasswd")

    def _step(self, name: str, wanted: bool, fn: object, why_not: str) -> None:
        if not wanted:
            self.records.append(StageRecord(name=name, action="skipped", reason=why_not))
            return
        assert callable(fn)
        fn()
        self.records.append(StageRecord(name=name, action="ran",
                                        reason="always runs after the package stage"))

    def _initramfs(self, s: ChrootSession, package_key: str | None, prev: Image | None) -> None:
        key = initrd_key(s.root, self.recipe, package_key)
        why = self._reuse_initrd(s.root, key, prev)
        if why is None:
            assert prev is not None and key is not None
            self.rep.line(f"initramfs reused from {prev.dir.name}")
            self.records.append(StageRecord(
                name="initramfs", action="reused", key=key, sha256=_initrds_digest(s.root),
                reason=f"same kernel, netboot hook and configuration as {prev.dir.name}"))
            return
        self.rep.line("update-initramfs")
        s.run(["update-initramfs", "-u", "-k", "all"], what="update-initramfs")
        self.records.append(StageRecord(name="initramfs", action="ran", key=key,
                                        sha256=_initrds_digest(s.root), reason=why))

    def _reuse_initrd(self, root: Path, key: str | None, prev: Image | None) -> str | None:
        """Copy the current generation's initrds into ``root`` when their key is ``key``; None
        when done, else why not (the reason the initramfs stage runs)."""
        if key is None:
            return "no package-stage key to compare with (the archive's InRelease was unreachable)"
        if prev is None:
            return "no earlier generation of this image to reuse it from"
        rec = prev.stage_record("initramfs")
        if rec is None or rec.key is None:
            return f"{prev.dir.name} records no initramfs key"
        if rec.key != key:
            return f"its inputs changed since {prev.dir.name} (kernel, netboot hook or initramfs configuration)"
        if rec.sha256 != _initrds_digest(prev.rootfs):
            return f"the initrd of {prev.dir.name} is missing or damaged"
        # with update-initramfs's record of each initrd's sha1 (it refuses to update an initrd
        # that does not match it)
        for src in [*sorted((prev.rootfs / "boot").glob("initrd.img-*")),
                    *sorted((prev.rootfs / "var/lib/initramfs-tools").glob("*"))]:
            dest = root / src.relative_to(prev.rootfs)
            tmp = dest.with_name(f".{dest.name}.sidusctl")
            shutil.copy2(src, tmp)
            os.replace(tmp, dest)
        return None

    def _netboot_hook(self, root: Path) -> None:
        from sidusctl.subsys.initramfs import install_netboot_hook

        nb = self.recipe.netboot
        install_netboot_hook(root, modules=nb.modules, nic=nb.nic or None)

    def _locales(self, s: ChrootSession) -> None:
        locs = self.recipe.locales
        if not locs:
            return
        root = s.root
        supported = root / "usr/share/i18n/SUPPORTED"
        lines = []
        sup = supported.read_text().splitlines() if supported.exists() else []
        for loc in locs:
            if loc == "C.UTF-8":
                continue
            match = [ln for ln in sup if ln.split()[0] == loc]
            if sup and not match:
                raise BuildError(f"{self.recipe.path}: key 'locales': {loc} is not a supported "
                                 "locale (see /usr/share/i18n/SUPPORTED in the image)")
            lines.append(match[0] if match else f"{loc} UTF-8")
        (root / "etc/locale.gen").write_text("# written by sidusctl build\n" + "\n".join(lines) + "\n")
        if lines:
            s.run(["locale-gen"], what="locale-gen")
        (root / "etc/default/locale").write_text(f"LANG={locs[0]}\n")

    def _timezone(self, s: ChrootSession) -> None:
        tz = self.recipe.timezone
        if not tz:
            return
        zone = s.root / "usr/share/zoneinfo" / tz
        if not zone.is_file():
            raise BuildError(f"{self.recipe.path}: key 'timezone': no zone {tz!r} in the image's "
                             "tzdata", hint="use a name from /usr/share/zoneinfo, e.g. Europe/Paris")
        lt = s.root / "etc/localtime"
        with contextlib.suppress(FileNotFoundError):
            lt.unlink()
        os.symlink(f"/usr/share/zoneinfo/{tz}", lt)
        (s.root / "etc/timezone").write_text(tz + "\n")

    def _keyboard(self, root: Path) -> None:
        kb = self.recipe.keyboard
        if kb is None:
            return
        (root / "etc/default").mkdir(parents=True, exist_ok=True)
        (root / "etc/default/keyboard").write_text(
            "# written by sidusctl build (keyboard(5))\n"
            f'XKBMODEL="{kb.model}"\nXKBLAYOUT="{kb.layout}"\nXKBVARIANT="{kb.variant}"\n'
            f'XKBOPTIONS="{kb.options}"\nBACKSPACE="guess"\n')

    def _files(self, root: Path) -> None:
        r = self.recipe
        ctx = {"image": r.name, "suite": r.suite, "arch": r.arch, **r.vars}
        for f in r.files:
            dest = _inside(root, f.dest)
            data = render_file(f.src, **ctx).encode() if f.template else f.src.read_bytes()
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink():
                dest.unlink()
            tmp = dest.with_name(f".{dest.name}.sidusctl")
            tmp.write_bytes(data)
            os.chown(tmp, _lookup_id(root, "passwd", f.owner, r),
                     _lookup_id(root, "group", f.group, r))
            os.chmod(tmp, f.mode)
            os.replace(tmp, dest)

    def _postinst(self, s: ChrootSession) -> None:
        """The recipe's ``postinst`` scripts, in order, inside the root, with the recipe's
        folder copied at :data:`RECIPE_IN_ROOT` (removed after, also on failure). Raises
        BuildError naming the script and the tail of its output when one fails."""
        r = self.recipe
        base = r.path.parent
        copy = s.root / RECIPE_IN_ROOT.lstrip("/")
        if copy.exists():
            shutil.rmtree(copy)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(base, copy, symlinks=True)
        env = {"SIDUSCTL_RECIPE_DIR": RECIPE_IN_ROOT, "SIDUSCTL_IMAGE": r.name}
        try:
            for script in r.postinst:
                rel = script.relative_to(base).as_posix()
                self.rep.line(f"postinst {rel}")
                try:
                    s.run([f"{RECIPE_IN_ROOT}/{rel}"], env=env, what=f"postinst {rel}",
                          on_line=self.rep.line, tail_lines=40)
                except CommandError as e:
                    raise BuildError(f"{r.path}: key 'postinst': {rel} failed in the image "
                                     f"(exit {e.returncode}):\n{e.output_tail.strip()}",
                                     hint=f"run it by hand in `sidusctl chroot {r.name}` to see why") from e
        finally:
            shutil.rmtree(copy, ignore_errors=True)

    def _tricks(self, root: Path) -> None:
        t = self.recipe.tricks
        if t.remove_hostname:
            with contextlib.suppress(FileNotFoundError):
                (root / "etc/hostname").unlink()
        if t.resolv_conf:
            rc = root / "etc/resolv.conf"
            with contextlib.suppress(FileNotFoundError):
                rc.unlink()
            rc.write_text("\n".join(t.resolv_conf) + "\n")
            # tells the netboot initramfs to keep it rather than write one from the DHCP lease
            (root / "etc/sidus").mkdir(parents=True, exist_ok=True)
            (root / "etc/sidus/resolv.static").write_text(
                "# the recipe's [tricks] resolv_conf is static: the sidus initramfs keeps it\n")
        if t.loopback_interfaces:
            (root / "etc/network").mkdir(parents=True, exist_ok=True)
            (root / "etc/network/interfaces").write_text(
                "# written by sidusctl build: loopback only; the boot interface is configured by\n"
                "# the kernel/initramfs (ip=dhcp) and must not be touched again (NFS root).\n"
                "auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n")
        if t.limits:
            d = root / "etc/security/limits.d"
            d.mkdir(parents=True, exist_ok=True)
            (d / "90-sidusctl.conf").write_text(
                "# written by sidusctl build (limits.conf(5))\n" + "\n".join(t.limits) + "\n")



def _root_hash(root: Path) -> str | None:
    """root's password hash in ``root/etc/shadow`` (None if unreadable or locked)."""
    with contextlib.suppress(OSError):
        for line in (root / "etc/shadow").read_text().splitlines():
            parts = line.split(":")
            if parts[0] == "root" and len(parts) > 1 and parts[1].startswith("$"):
                return parts[1]
    return None


def _same_password(password: str, hashed: str) -> bool:
    """True when ``hashed`` (crypt(3) form: yescrypt, sha512crypt...) is of ``password``, as
    the host's libcrypt computes it; False when it cannot tell (no crypt module)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # libxcrypt: knows yescrypt; deprecated in 3.11, gone in 3.13
    except ImportError:
        return False
    try:
        return bool(crypt.crypt(password, hashed) == hashed)
    except (OSError, ValueError):
        return False


def _initrds_digest(root: Path) -> str:
    """sha256 over the names and contents of ``root/boot/initrd.img-*``."""
    h = hashlib.sha256()
    for p in sorted((root / "boot").glob("initrd.img-*")):
        h.update(f"{p.name} {file_sha256(p)}\n".encode())
    return h.hexdigest()


def _write_pins(root: Path, exclude: tuple[str, ...]) -> None:
    d = root / "etc/apt/preferences.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / "90sidusctl-exclude").write_text(
        "# written by sidusctl build: the recipe's exclude list (apt_preferences(5))\n"
        + "".join(f"Package: {p}\nPin: release *\nPin-Priority: -1\n\n" for p in exclude))




def _inside(root: Path, dest: str) -> Path:
    p = (root / dest.lstrip("/")).resolve(strict=False)
    rr = root.resolve()
    parent = p.parent
    # a symlinked parent in the image may not lead out of it
    if not (str(parent) + "/").startswith(str(rr) + "/") and parent != rr:
        raise BuildError(f"site file destination {dest} leads outside the root")
    return root / dest.lstrip("/")


def _lookup_id(root: Path, db: str, name: str, recipe: Recipe) -> int:
    """uid/gid of ``name`` in the ROOT's /etc/passwd or /etc/group (not the host's)."""
    if name.isdigit():
        return int(name)
    f = root / "etc" / db
    for line in f.read_text().splitlines() if f.exists() else []:
        parts = line.split(":")
        if len(parts) > 2 and parts[0] == name:
            return int(parts[2])
    raise BuildError(f"{recipe.path}: key 'files': {'user' if db == 'passwd' else 'group'} "
                     f"{name!r} does not exist in the image's /etc/{db}")


