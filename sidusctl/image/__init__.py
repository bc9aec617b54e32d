"""The image service: recipe → Debian rootfs (debootstrap or mmdebstrap, then a chroot
session), manifest, kernel + initrd and rootfs tarball exports, updates."""
