"""The OS user behind a loopback TCP connection, read from /proc/net/tcp{,6}.

Shared memory is guarded by the OS: a process maps only segments its user may
open. A server that maps segments for its callers must apply the same rule for
them, so it needs the caller's uid. gRPC gives a peer address only ("ipv4:
127.0.0.1:54321"); on Linux the kernel lists every TCP socket of the network
namespace with its owner's uid, so the peer's own socket (local address = the
peer's address) names its user.

The row must also be connected back to a socket of the server's user whose
remote end is the peer: a connection to us, not one elsewhere that happens to
reuse the port. Anything ambiguous (no row, rows of several users) is refused;
the caller of `peer_uid` gets FAILED_PRECONDITION saying why."""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from kernelmesh.core.errors import FailedPrecondition

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[IPAddress, int]

TCP_TABLES = ("net/tcp", "net/tcp6")
_ESTABLISHED = "01"


@dataclass(frozen=True)
class SocketRow:
    local: Endpoint
    remote: Endpoint
    uid: int


def _normal(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (::ffff:127.0.0.1) as the IPv4 address it maps: a dual-stack
    listener sees an IPv4 client that way, while the client's socket is IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_peer(peer: str) -> Endpoint | None:
    """(address, port) of a gRPC peer string: "ipv4:127.0.0.1:54321",
    "ipv6:[::1]:54321", or URL-encoded "ipv6:%5B::1%5D:54321". None for any other
    kind of peer (a unix socket) or a string that does not parse."""
    kind, _, rest = unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return None
    if kind == "ipv6":
        if not (host.startswith("[") and host.endswith("]")):
            return None
        host = host[1:-1].split("%")[0]  # a zone index ("fe80::1%eth0") is not an address
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return _normal(address), int(port)


def decode_address(text: str, byteorder: str = sys.byteorder) -> IPAddress:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words, each in the host's
    byte order as %08X (one word for IPv4, four for IPv6)."""
    if len(text) not in (8, 32):
        raise ValueError(f"not a /proc/net/tcp address: {text!r}")
    raw = b"".join(
        int(text[i : i + 8], 16).to_bytes(4, byteorder)  # type: ignore[arg-type]
        for i in range(0, len(text), 8)
    )
    return _normal(ipaddress.ip_address(raw))


def decode_endpoint(text: str, byteorder: str = sys.byteorder) -> Endpoint:
    """ "0100007F:1F90" -> (127.0.0.1, 8080); the port is plain hex."""
    address, _, port = text.partition(":")
    return decode_address(address, byteorder), int(port, 16)


def parse_table(text: str, byteorder: str = sys.byteorder) -> list[SocketRow]:
    """The ESTABLISHED rows of one /proc/net/tcp or tcp6 file."""
    rows = []
    for line in text.splitlines()[1:]:  # the first line is the header
        fields = line.split()
        # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
        if len(fields) < 8 or fields[3] != _ESTABLISHED:
            continue
        try:
            rows.append(
                SocketRow(
                    decode_endpoint(fields[1], byteorder),
                    decode_endpoint(fields[2], byteorder),
                    int(fields[7]),
                )
            )
        except ValueError:
            continue
    return rows


def read_tables(proc: Path = Path("/proc")) -> list[SocketRow] | None:
    """Every ESTABLISHED TCP socket of this network namespace; None without /proc."""
    rows: list[SocketRow] = []
    found = False
    for name in TCP_TABLES:
        try:
            text = (proc / name).read_text()
        except OSError:
            continue
        found = True
        rows.extend(parse_table(text))
    return rows if found else None


def owner_uids(rows: Iterable[SocketRow], peer: Endpoint, server_uid: int) -> set[int]:
    """The uids of the peer's sockets that are connected to a socket of `server_uid`
    whose remote end is the peer (normally exactly one)."""
    rows = list(rows)
    ours = {r.local for r in rows if r.remote == peer and r.uid == server_uid}
    return {r.uid for r in rows if r.local == peer and r.remote in ours}


def peer_uid(peer: str, *, server_uid: int | None = None, proc: Path = Path("/proc")) -> int:
    """The uid of the process behind a loopback gRPC peer; FAILED_PRECONDITION when
    it cannot be told for sure."""
    endpoint = parse_peer(peer)
    if endpoint is None:
        raise FailedPrecondition(
            "shared memory needs a TCP connection over loopback, whose user the server "
            f"can identify; this call came over {peer.partition(':')[0] or 'an unknown transport'}"
        )
    rows = read_tables(proc)
    if rows is None:
        raise FailedPrecondition(
            "the server cannot identify the calling process's user (no /proc/net/tcp on "
            "its host), so it maps no shared memory for it (send tensor bytes instead)"
        )
    uids = owner_uids(rows, endpoint, os.geteuid() if server_uid is None else server_uid)
    if len(uids) != 1:
        raise FailedPrecondition(
            "the server cannot identify the calling process's user from its connection "
            f"({len(uids)} candidates), so it maps no shared memory for it"
        )
    return uids.pop()


__all__ = [
    "SocketRow",
    "decode_address",
    "decode_endpoint",
    "owner_uids",
    "parse_peer",
    "parse_table",
    "peer_uid",
    "read_tables",
]
