"""What Linux's ``/proc`` says about processes and listening sockets: plain reads, no signals.

Used where a pid or a port must be tied to the process that was started, not to whatever holds
the number now: a pid is recycled once its process is reaped, and a port can be bound by another
program between a "free?" check and our server's own bind. Elsewhere (no ``/proc``) the port
reads return None, and callers fall back to what they can check.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

__all__ = ["listening_inodes", "socket_inodes", "start_ticks", "stat_fields"]

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3 onwards of ``/proc/<pid>/stat`` (state, ppid, pgrp, session, ... starttime at
    [19]), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return stat.rsplit(")", 1)[1].split()


def start_ticks(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if it is not running."""
    fields = stat_fields(pid)
    if fields is None or fields[0] == "Z":  # a zombie has exited
        return None
    return int(fields[19])


def _address(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address column of /proc/net/tcp{,6}: 32-bit words in the host's byte order."""
    raw = bytes.fromhex(hex_ip)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def _host_addresses(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """What ``host`` (a literal or a name) stands for; empty if it does not resolve."""
    try:
        return {ipaddress.ip_address(host.strip("[]"))}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return set()
    return {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}


def listening_inodes(port: int, host: str | None = None) -> set[int] | None:
    """Inodes of the TCP sockets listening on ``port``, or None where ``/proc/net/tcp`` cannot
    be read (not Linux). With ``host``, only those a connection to ``host:port`` could reach:
    bound to one of its addresses or to a wildcard (``0.0.0.0``, ``::``); a listener on another
    address of the machine is someone else's business."""
    wanted = None if host is None else _host_addresses(host)
    found: set[int] = set()
    read_any = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        read_any = True
        for line in lines:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            cols = line.split()
            if len(cols) < 10 or cols[3] != _LISTEN:
                continue
            hex_ip, hex_port = cols[1].rsplit(":", 1)
            if int(hex_port, 16) != port:
                continue
            if wanted is not None:
                addr = _address(hex_ip)
                mapped = getattr(addr, "ipv4_mapped", None)
                if not (addr.is_unspecified or addr in wanted or mapped in wanted):
                    continue
            found.add(int(cols[9]))
    return found if read_any else None


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` holds open (empty when its descriptors cannot be read: it
    exited, or it is another user's)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return set()
    found: set[int] = set()
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed while we looked
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found
