"""SSH keys in a vnode's root, exactly as Distem's FAQ says:

1. complete (or create) ``/root/.ssh/authorized_keys`` with the host's
   ``/root/.ssh/authorized_keys`` and the host's ``/root/.ssh/*.pub`` keys;
2. copy the host's ``/root/.ssh/id*`` into the vnode's ``/root/.ssh`` only where the target does
   not exist, and only when asked (``copy_host_keys``): it puts the host's PRIVATE keys in every
   vnode, so anyone root in a vnode can act as the host's root elsewhere;
3. add the public key given as a parameter to ``authorized_keys``;
4. write the private key given as a parameter to ``/root/.ssh/identity`` (overwriting it).

Paths are checked so that a symlink planted in an image can never make us write on the host.
"""

from __future__ import annotations

import os
from pathlib import Path

from sidusctl.core.errors import StateError

HOST_SSH = Path("/root/.ssh")


def _safe_dir(rootfs: Path, rel: str, mode: int) -> Path:
    cur = rootfs
    for part in Path(rel).parts:
        cur = cur / part
        if cur.is_symlink():
            raise StateError(f"{cur} is a symlink in the vnode's root; refusing to write keys")
        if not cur.exists():
            cur.mkdir(mode=mode)
    return cur


def _write(path: Path, data: bytes, mode: int) -> None:
    if path.is_symlink():
        raise StateError(f"{path} is a symlink in the vnode's root; refusing to write keys")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    os.chown(path, 0, 0)


def host_public_keys(host_ssh: Path = HOST_SSH) -> list[str]:
    """Lines of the host's authorized_keys and *.pub files (comments and blanks dropped)."""
    lines: list[str] = []
    files = [host_ssh / "authorized_keys", *sorted(host_ssh.glob("*.pub"))] if host_ssh.is_dir() else []
    for f in files:
        if f.is_file():
            for ln in f.read_text(errors="replace").splitlines():
                ln = ln.strip()
                if ln and not ln.startswith("#"):
                    lines.append(ln)
    return lines


def inject(rootfs: Path, *, pubkey: str | None, privkey: str | None, copy_host_keys: bool,
           host_ssh: Path = HOST_SSH) -> list[str]:
    """Apply the four rules above to ``rootfs``; returns what was done (one line each)."""
    done: list[str] = []
    root_home = _safe_dir(rootfs, "root", 0o700)
    ssh = _safe_dir(rootfs, "root/.ssh", 0o700)
    os.chmod(ssh, 0o700)
    del root_home
    ak = ssh / "authorized_keys"
    existing = ak.read_text(errors="replace").splitlines() if ak.is_file() else []
    want = list(existing)
    extra = host_public_keys(host_ssh)
    if pubkey:
        extra += [ln.strip() for ln in pubkey.splitlines() if ln.strip()]
    for ln in extra:
        if ln not in want:
            want.append(ln)
    if want != existing or not ak.exists():
        _write(ak, ("\n".join(want) + "\n").encode() if want else b"", 0o600)
        done.append(f"authorized_keys: {len(want) - len(existing)} key(s) added")
    if copy_host_keys and host_ssh.is_dir():
        for src in sorted(host_ssh.glob("id*")):
            dst = ssh / src.name
            if src.is_file() and not dst.exists() and not dst.is_symlink():
                _write(dst, src.read_bytes(), 0o644 if src.name.endswith(".pub") else 0o600)
                done.append(f"copied host key {src.name}")
    if privkey:
        data = privkey if privkey.endswith("\n") else privkey + "\n"
        _write(ssh / "identity", data.encode(), 0o600)
        done.append("wrote /root/.ssh/identity")
    return done
