"""The netboot servers of ``serve-pxe``: DHCP (full and proxyDHCP), TFTP and DNS, run in one
asyncio event loop by :mod:`sidusctl.serve.supervisor`.

Inputs are plain typed values (:class:`~sidusctl.serve.dhcp_config.Reservation`,
:class:`~sidusctl.serve.dhcp_config.BootPolicy`, a TFTP root path, a :class:`~sidusctl.serve.dns.Zone`)
so that any inventory can feed them.
"""
