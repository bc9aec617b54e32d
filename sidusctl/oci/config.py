"""The image config made useful outside a container engine (what Distem's FAQ says to do by
hand after ``docker export``): Entrypoint + Cmd, Env, WorkingDir and User become

- a systemd unit, enabled at boot, when the image has systemd (``/lib/systemd/systemd``);
- otherwise, when it has a SysV init (``/sbin/init`` and ``/etc/rc2.d``), an LSB init
  script enabled in ``/etc/rc[0-6].d``;
- always an LXC config snippet (``lxc.init.cmd``/``lxc.execute.cmd``, ``lxc.environment``,
  ``lxc.init.cwd``, ``lxc.init.uid``/``gid``): with no init in the image, the command itself
  runs as the container's init (PID 1), as ``docker run`` would.

Semantics follow the OCI image spec (``config.md``) and Docker: the command is
``Entrypoint + Cmd`` (an override replaces Cmd); exec form is kept argument by argument (no
``$VAR`` expansion, no word splitting); shell form is already ``["/bin/sh", "-c", "..."]`` in
the config. ``User`` is ``user``, ``uid``, ``user:group`` or ``uid:gid`` looked up in the
image's own ``/etc/passwd`` and ``/etc/group`` (a numeric uid absent from passwd gets gid 0).
``PATH`` defaults to Docker's and ``HOME`` to the user's home when the image sets none.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sidusctl.oci import ImageError
from sidusctl.subsys.rootio import (
    lexists_in_root,
    read_file_in_root,
    symlink_in_root,
    write_file_in_root,
)
from sidusctl.subsys.templates import render

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEMD_PATHS = ("lib/systemd/systemd", "usr/lib/systemd/systemd")
INIT_PATHS = ("sbin/init", "usr/sbin/init")


@dataclass
class Runtime:
    """What will run: ``argv`` (may be empty), ``env`` pairs, ``cwd``, ``user`` as written in
    the config and its resolution ``uid``/``gid``/``username``; ``init``: ``systemd``,
    ``sysvinit`` or ``none``; ``files`` written (paths inside the rootfs or the image dir)."""

    argv: list[str]
    env: list[tuple[str, str]]
    cwd: str
    user: str
    uid: int
    gid: int
    username: str | None
    init: str
    init_path: str | None = None
    unit: str | None = None
    files: list[str] = field(default_factory=list)
    lxc_snippet: str | None = None
    note: str = ""


def _table(rootfs: Path, rel: str) -> list[list[str]]:
    data = read_file_in_root(rootfs, rel)
    if data is None:
        return []
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def resolve_user(rootfs: Path, user: str) -> tuple[int, int, str | None, str | None]:
    """(uid, gid, user name or None, home or None) for a config ``User`` string, looked up in
    the image's /etc/passwd and /etc/group. ImageError for a name the image does not know."""
    if not user:
        user = "0"
    name, _, group = user.partition(":")
    passwd = [r for r in _table(rootfs, "etc/passwd") if len(r) >= 7]
    entry = None
    if name.isdigit():
        uid = int(name)
        entry = next((r for r in passwd if r[2] == name), None)
    else:
        entry = next((r for r in passwd if r[0] == name), None)
        if entry is None:
            raise ImageError(f"image config User '{user}': no user '{name}' in the image's "
                             "/etc/passwd")
        uid = int(entry[2])
    gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = next((r for r in _table(rootfs, "etc/group") if len(r) >= 3 and r[0] == group),
                     None)
            if g is None or not g[2].isdigit():
                raise ImageError(f"image config User '{user}': no group '{group}' in the "
                                 "image's /etc/group")
            gid = int(g[2])
    return uid, gid, entry[0] if entry else None, entry[5] if entry else None


def detect_init(rootfs: Path) -> tuple[str, str | None]:
    """("systemd"|"sysvinit"|"none", path of the init inside the image or None).

    ``sysvinit`` needs an ``/sbin/init`` AND sysv-rc's ``/etc/rc2.d`` (where the script is
    enabled): Alpine's or busybox's ``/sbin/init`` alone would never start it, so such
    application images count as ``none`` and run their command as PID 1, as Docker does."""
    for p in SYSTEMD_PATHS:
        if lexists_in_root(rootfs, p):
            return "systemd", "/" + p
    for p in INIT_PATHS:
        if lexists_in_root(rootfs, p) and lexists_in_root(rootfs, "etc/rc2.d"):
            return "sysvinit", "/" + p
    return "none", None


def which_in_root(rootfs: Path, cmd: str, path: str) -> str | None:
    """Absolute path of ``cmd`` found on ``path`` inside the image (None if absent)."""
    if cmd.startswith("/"):
        return cmd
    if "/" in cmd:
        return None
    for d in path.split(":"):
        if d.startswith("/") and lexists_in_root(rootfs, f"{d.strip('/')}/{cmd}"):
            return f"{d.rstrip('/')}/{cmd}"
    return None


def plan(rootfs: Path, cfg: dict[str, Any], cmd_override: list[str] | None = None) -> Runtime:
    """Resolve the config into a :class:`Runtime` (nothing written)."""
    ep = cfg.get("Entrypoint") or []
    cmd = cmd_override if cmd_override is not None else (cfg.get("Cmd") or [])
    if not isinstance(ep, list) or not isinstance(cmd, list):
        raise ImageError("image config Entrypoint/Cmd must be lists of strings")
    argv = [str(a) for a in (*ep, *cmd)]
    env: list[tuple[str, str]] = []
    for e in cfg.get("Env") or []:
        k, sep, v = str(e).partition("=")
        if not sep or not _ENV_NAME.match(k):
            raise ImageError(f"image config Env entry {e!r} is not NAME=VALUE with a shell "
                             "variable name")
        if any(c in v for c in "\n\r\0"):
            # lxc.conf is read by lxc-start on the host: a newline would add config lines
            raise ImageError(f"image config Env {k}: the value holds a line break or NUL")
        env = [(a, b) for a, b in env if a != k] + [(k, v)]
    user = str(cfg.get("User") or "")
    uid, gid, username, home = resolve_user(rootfs, user)
    if not any(k == "PATH" for k, _ in env):
        env.insert(0, ("PATH", DEFAULT_PATH))
    if not any(k == "HOME" for k, _ in env):
        env.append(("HOME", home or "/"))
    cwd = str(cfg.get("WorkingDir") or "/")
    if any(ord(c) < 0x20 or c == "\x7f" for c in cwd):
        raise ImageError(f"image config WorkingDir {cwd!r} holds control characters")
    if not cwd.startswith("/"):
        cwd = "/" + cwd
    init, init_path = detect_init(rootfs)
    return Runtime(argv=argv, env=env, cwd=cwd, user=user, uid=uid, gid=gid,
                   username=username, init=init, init_path=init_path)


# -- quoting ------------------------------------------------------------------------------------

def systemd_quote(arg: str) -> str:
    """One argument for ExecStart=/Environment= (systemd.syntax(7), systemd.service(5)):
    double-quoted, C escapes for ``\\``, ``"`` and control characters, ``$`` -> ``$$`` (no
    variable expansion) and ``%`` -> ``%%`` (no specifier expansion). A lone ``;`` would
    separate commands, so it is written ``\\;`` as systemd.service(5) says."""
    if arg == ";":
        return "\\;"
    out = []
    for ch in arg:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        elif ch == "$":
            out.append("$$")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def lxc_quote(arg: str) -> str | None:
    """One argument for ``lxc.init.cmd``/``lxc.execute.cmd``. LXC splits these on blanks and
    honours a '...' or "..." word without escapes, so an argument holding both quote kinds,
    a newline, or a quote char not at a word start cannot be written (None)."""
    if "\n" in arg or "\r" in arg:
        return None
    if arg and not any(c.isspace() or c in "'\"" for c in arg):
        return arg
    if "'" not in arg:
        return f"'{arg}'"
    if '"' not in arg:
        return f'"{arg}"'
    return None


def lxc_command(argv: list[str]) -> str | None:
    """``argv`` as an LXC command line, or None if some argument cannot be expressed."""
    words = [lxc_quote(a) for a in argv]
    if any(w is None for w in words):
        return None
    return " ".join(w for w in words if w is not None)


# -- installation -------------------------------------------------------------------------------

def install_runtime(rootfs: Path, image_dir: Path, cfg: dict[str, Any], *, image: str,
                    source: str, cmd_override: list[str] | None = None,
                    unit_name: str = "oci-cmd") -> dict[str, Any]:
    """Write the unit or init script into ``rootfs`` and ``lxc.conf`` into ``image_dir``;
    returns the manifest's ``runtime`` record (command, user, init, files, note)."""
    rt = plan(rootfs, cfg, cmd_override)
    path_env = next(v for k, v in rt.env if k == "PATH")
    exe = which_in_root(rootfs, rt.argv[0], path_env) if rt.argv else None
    argv_abs = [exe or rt.argv[0], *rt.argv[1:]] if rt.argv else []
    who = f"uid {rt.uid}" + (f" ({rt.username})" if rt.username else "") + f", gid {rt.gid}"
    source = "".join(c if c.isprintable() else "?" for c in source)  # it lands in comments
    ctx: dict[str, Any] = {"image": image, "source": source, "rt": rt, "unit": unit_name,
                           "who": who}
    if rt.argv and exe is None:
        ctx["missing"] = rt.argv[0]
    # lxc.execute.cmd is split honouring quotes; lxc.init.cmd only on blanks (LXC 5,
    # split_init_cmd): arguments with blanks there go through a small sh wrapper.
    lxc_exec = lxc_command(rt.argv) if rt.argv else None
    lxc_init = " ".join(rt.argv) if rt.argv and all(
        a and not any(c.isspace() for c in a) for a in rt.argv) else None
    if rt.argv and (lxc_init is None or lxc_exec is None):
        if lexists_in_root(rootfs, "bin/sh") or lexists_in_root(rootfs, "usr/bin/sh"):
            wrapper = f"usr/local/libexec/sidusctl/{unit_name}.sh"
            script = ("#!/bin/sh\n# sidusctl import: the image's command, quoted for sh "
                      "(lxc.init.cmd splits on blanks)\nexec "
                      + " ".join(shlex.quote(a) for a in rt.argv) + "\n")
            write_file_in_root(rootfs, wrapper, script.encode(), 0o755)
            rt.files.append("/" + wrapper)
            lxc_init = lxc_init or "/" + wrapper
            lxc_exec = lxc_exec or "/" + wrapper
        elif lxc_exec is None:
            raise ImageError("the image's command has an argument LXC cannot quote (both "
                             "quote kinds or a newline) and the image has no /bin/sh for a "
                             "wrapper")
    ctx["lxc_cmd"] = lxc_init
    ctx["lxc_exec"] = lxc_exec
    if rt.argv and rt.init == "systemd":
        rt.unit = f"{unit_name}.service"
        unit = render("oci/service.j2", exec_start=" ".join(systemd_quote(a) for a in argv_abs),
                      environment=[systemd_quote(f"{k}={v}") for k, v in rt.env], **ctx)
        rel = f"etc/systemd/system/{rt.unit}"
        write_file_in_root(rootfs, rel, unit.encode())
        symlink_in_root(rootfs, f"etc/systemd/system/multi-user.target.wants/{rt.unit}",
                        f"/{rel}")
        rt.files += ["/" + rel, f"/etc/systemd/system/multi-user.target.wants/{rt.unit}"]
        rt.note = (f"systemd ({rt.init_path}) is the container's init; it starts {rt.unit} "
                   f"at boot, running {_show(rt.argv)} as {who} in {rt.cwd}")
    elif rt.argv and rt.init == "sysvinit":
        rt.unit = unit_name
        script = render("oci/init.sh.j2", argv=" ".join(shlex.quote(a) for a in argv_abs),
                        exe=shlex.quote(argv_abs[0]),
                        args=" ".join(shlex.quote(a) for a in argv_abs[1:]),
                        env=[(k, shlex.quote(v)) for k, v in rt.env],
                        cwd=shlex.quote(rt.cwd), **ctx)
        rel = f"etc/init.d/{unit_name}"
        write_file_in_root(rootfs, rel, script.encode(), 0o755)
        rt.files.append("/" + rel)
        enabled = []
        for lvl, kind in (("2", "S"), ("3", "S"), ("4", "S"), ("5", "S"), ("0", "K"),
                          ("1", "K"), ("6", "K")):
            d = f"etc/rc{lvl}.d"
            if lexists_in_root(rootfs, d):
                symlink_in_root(rootfs, f"{d}/{kind}01{unit_name}", f"../init.d/{unit_name}")
                enabled.append(f"/{d}/{kind}01{unit_name}")
        rt.files += enabled
        rt.note = (f"{rt.init_path} is the container's init; /etc/init.d/{unit_name} runs "
                   f"{_show(rt.argv)} as {who} in {rt.cwd}")
    elif rt.argv:
        rt.note = (f"the image has no init system: the container runs {_show(rt.argv)} itself "
                   f"as PID 1 (lxc.init.cmd), as {who} in {rt.cwd}, like docker run")
    elif rt.init != "none":
        rt.note = (f"the image sets no command; its init {rt.init_path} runs as PID 1")
    else:
        rt.note = ("the image has neither an init system nor a command (Entrypoint/Cmd): give "
                   "one with --cmd, or run something with lxc-execute")
    snippet = render("oci/lxc.conf.j2", **ctx)
    (image_dir / "lxc.conf").write_text(snippet)
    rt.lxc_snippet = "lxc.conf"  # relative to the image (generation) directory
    rec = asdict(rt)
    rec["env"] = [f"{k}={v}" for k, v in rt.env]
    rec["command"] = rec.pop("argv")
    return rec


def _show(argv: list[str]) -> str:
    return "[" + ", ".join(repr(a) for a in argv) + "]"


__all__ = ["Runtime", "detect_init", "install_runtime", "lxc_command", "plan", "resolve_user",
           "systemd_quote"]

