"""Host-side networking of vnodes through pyroute2 (rtnetlink): bridges, VXLAN links, network
namespaces (:mod:`.links`) and traffic-control qdiscs (:mod:`.tc`). Every function takes an
optional ``netns`` (a name under /run/netns or a path such as ``/proc/PID/ns/net``) so that the
same code drives the host, a namespace acting as a second host, or a vnode's own namespace.
"""
