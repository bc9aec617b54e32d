"""The netboot service: everything that turns an image into diskless machines booting it.

- :mod:`~sidusctl.netboot.inventory`: ``nodes.toml`` (nodes, groups, defaults, network);
- :mod:`~sidusctl.netboot.tree`: the boot-loader tree (pxelinux, iPXE, GRUB) served over TFTP;
- :mod:`~sidusctl.netboot.nfs`: the NFS exports of image roots (nfs-ganesha, exports(5));
- :mod:`~sidusctl.netboot.daemons`: configurations for other DHCP daemons (dnsmasq, dhcpd, Kea);
- :mod:`~sidusctl.netboot.servepxe`: the ``serve-pxe`` composition, feeding the protocol
  servers of :mod:`sidusctl.serve` plain typed values;
- :mod:`~sidusctl.netboot.pxesupervisor`: serve-pxe running: per-node status, the generations
  running nodes hold;
- :mod:`~sidusctl.netboot.lab`: a throw-away PXE lab (namespace, bridge, qemu guests).
"""
