"""sidusctl: build Debian roots, netboot diskless machines from them, import OCI images into
them and run them as Distem-style virtual nodes.

The package is layered (imports go downward only): ``cli`` → services (``build``, ``oci``,
``boot``, ``serve``, ``vnode``) → subsystems (``subsys``) → ``core``.
"""

__version__ = "0.1.0"
