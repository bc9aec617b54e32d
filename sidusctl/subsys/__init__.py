"""Subsystems: one kind of OS resource each (mounts, processes in a root, chroot sessions,
templates, ...), always created through a context manager or an idempotent ensure/remove pair."""
