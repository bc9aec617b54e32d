"""SSH keys in a vnode's root, exactly as Distem's FAQ says:

1. complete (or create) ``/root/.ssh/authorized_keys`` with the host's
   ``/root/.ssh/authorized_keys`` and the host's ``/root/.ssh/*.pub`` keys;
2. copy the host's ``/root/.ssh/id*`` into the vnode's ``/root/.ssh`` only where the target does
   not exist, and only when asked (``copy_host_keys``): it puts the host's PRIVATE keys in every
   vnode, so anyone root in a vnode can act as the host's root elsewhere;
3. add the public key given as a parameter to ``authorized_keys``;
4. write the private key given as a parameter to ``/root/.ssh/identity`` (overwriting it).

Every read and write in the vnode's root goes through :mod:`sidusctl.subsys.rootio`
(``openat``/``O_NOFOLLOW``), so a symlink planted in an image can never make us read or write
on the host.
"""

from __future__ import annotations

from pathlib import Path

from sidusctl.subsys.rootio import (
    lexists_in_root,
    mkdir_in_root,
    read_file_in_root,
    write_file_in_root,
)

HOST_SSH = Path("/root/.ssh")


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
    mkdir_in_root(rootfs, "root/.ssh", 0o700)
    ak = "root/.ssh/authorized_keys"
    raw = read_file_in_root(rootfs, ak)
    existing = raw.decode(errors="replace").splitlines() if raw is not None else []
    want = list(existing)
    extra = host_public_keys(host_ssh)
    if pubkey:
        extra += [ln.strip() for ln in pubkey.splitlines() if ln.strip()]
    for ln in extra:
        if ln not in want:
            want.append(ln)
    if want != existing or raw is None:
        write_file_in_root(rootfs, ak, ("\n".join(want) + "\n").encode() if want else b"",
                           0o600)
        done.append(f"authorized_keys: {len(want) - len(existing)} key(s) added")
    if copy_host_keys and host_ssh.is_dir():
        for src in sorted(host_ssh.glob("id*")):
            dst = f"root/.ssh/{src.name}"
            if src.is_file() and not lexists_in_root(rootfs, dst):
                write_file_in_root(rootfs, dst, src.read_bytes(),
                                   0o644 if src.name.endswith(".pub") else 0o600)
                done.append(f"copied host key {src.name}")
    if privkey:
        data = privkey if privkey.endswith("\n") else privkey + "\n"
        write_file_in_root(rootfs, "root/.ssh/identity", data.encode(), 0o600)
        done.append("wrote /root/.ssh/identity")
    return done
