"""Listening sockets that several worker processes share (SO_REUSEPORT).

With `iiot run --workers N` every worker binds the same port; the kernel then spreads new
TCP connections (or UDP datagrams, by source address) among them. Any listener that is
meant to be shared this way creates its socket here.
"""

from __future__ import annotations

import socket

__all__ = ["reuse_port_socket"]


def reuse_port_socket(host: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket bound to `host:port` with SO_REUSEADDR and SO_REUSEPORT; TCP ones listen.

    Raises OSError when the port is taken by a process that did not set SO_REUSEPORT.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    proto = socket.IPPROTO_TCP if kind == socket.SOCK_STREAM else socket.IPPROTO_UDP
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
