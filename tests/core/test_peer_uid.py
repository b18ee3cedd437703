"""core.peer_uid: gRPC peer strings, /proc/net/tcp{,6} address formats, and the
uid of the process behind a loopback connection."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

from kernelmesh.core.errors import FailedPrecondition
from kernelmesh.core.peer_uid import (
    SocketRow,
    decode_address,
    decode_endpoint,
    owner_uids,
    parse_peer,
    parse_table,
    peer_uid,
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode\n"
)


def row(local: str, remote: str, state: str, uid: int) -> str:
    return (
        f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000 "
        f"{uid:>5}        0 1281505 1 0000000000000000 20 4 23 14 -1\n"
    )


@pytest.mark.parametrize(
    ("peer", "endpoint"),
    [
        ("ipv4:127.0.0.1:54321", (V4("127.0.0.1"), 54321)),
        ("ipv6:[::1]:54321", (V6("::1"), 54321)),
        ("ipv6:%5B::1%5D:54321", (V6("::1"), 54321)),
        ("ipv6:[::ffff:127.0.0.1]:80", (V4("127.0.0.1"), 80)),  # a dual-stack listener
        ("ipv6:[fe80::1%25lo]:80", (V6("fe80::1"), 80)),
    ],
)
def test_tcp_peers_parse_to_an_address_and_port(peer, endpoint):
    assert parse_peer(peer) == endpoint


@pytest.mark.parametrize(
    "peer",
    ["", "unix:/tmp/km.sock", "unix-abstract:km", "ipv4:127.0.0.1", "ipv6:::1:80", "ipv4:x:1"],
)
def test_other_peers_do_not_parse(peer):
    assert parse_peer(peer) is None


def test_ipv4_is_one_little_endian_word():
    assert decode_address("0100007F", "little") == V4("127.0.0.1")
    assert decode_address("0101A8C0", "little") == V4("192.168.1.1")
    assert decode_address("7F000001", "big") == V4("127.0.0.1")
    assert decode_endpoint("0100007F:D431", "little") == (V4("127.0.0.1"), 54321)


def test_ipv6_is_four_little_endian_words():
    assert decode_address("00000000000000000000000001000000", "little") == V6("::1")
    assert decode_address("B80D0120000000000000000001000000", "little") == V6("2001:db8::1")
    assert decode_address("00000000000000000000000000000001", "big") == V6("::1")


def test_ipv4_mapped_ipv6_decodes_as_ipv4():
    assert decode_address("0000000000000000FFFF00000100007F", "little") == V4("127.0.0.1")


@pytest.mark.parametrize("text", ["", "0100007", "0100007F00", "ZZ00007F"])
def test_a_malformed_address_is_refused(text):
    with pytest.raises(ValueError):
        decode_address(text, "little")


CLIENT = (V4("127.0.0.1"), 54321)
SERVER = (V4("127.0.0.1"), 50051)


def test_only_established_rows_are_read():
    text = HEADER + row("0100007F:C383", "00000000:0000", "0A", 0)  # LISTEN
    text += row("0100007F:D431", "0100007F:C383", "01", 1000)
    text += row("0100007F:D432", "0100007F:C383", "06", 1001)  # TIME_WAIT
    assert parse_table(text, "little") == [SocketRow(CLIENT, SERVER, 1000)]


def test_the_peer_socket_connected_to_ours_names_the_user():
    rows = [
        SocketRow(CLIENT, SERVER, 1000),  # the caller's socket
        SocketRow(SERVER, CLIENT, 0),  # ours, accepted from it
        # the same local port reused (SO_REUSEADDR) by another user towards elsewhere
        SocketRow(CLIENT, (V4("127.0.0.1"), 5432), 1001),
    ]
    assert owner_uids(rows, CLIENT, server_uid=0) == {1000}


def test_a_peer_not_connected_to_a_socket_of_ours_has_no_user():
    rows = [SocketRow(CLIENT, SERVER, 1000), SocketRow(SERVER, CLIENT, 1002)]
    assert owner_uids(rows, CLIENT, server_uid=0) == set()


def write_proc(root: Path, tcp: str, tcp6: str | None = None) -> Path:
    (root / "net").mkdir(parents=True)
    (root / "net" / "tcp").write_text(tcp)
    if tcp6 is not None:
        (root / "net" / "tcp6").write_text(tcp6)
    return root


def test_peer_uid_reads_both_tables(tmp_path):
    # An IPv4 client of a dual-stack listener: its socket is in tcp, ours in tcp6.
    proc = write_proc(
        tmp_path,
        HEADER + row("0100007F:D431", "0100007F:C383", "01", 1000),
        HEADER
        + row(
            "0000000000000000FFFF00000100007F:C383",
            "0000000000000000FFFF00000100007F:D431",
            "01",
            0,
        ),
    )
    assert peer_uid("ipv6:[::ffff:127.0.0.1]:54321", server_uid=0, proc=proc) == 1000
    assert peer_uid("ipv4:127.0.0.1:54321", server_uid=0, proc=proc) == 1000


def test_peer_uid_refuses_what_it_cannot_tell(tmp_path):
    with pytest.raises(FailedPrecondition, match="TCP connection over loopback"):
        peer_uid("unix:/tmp/km.sock", proc=tmp_path)
    with pytest.raises(FailedPrecondition, match="no /proc/net/tcp"):
        peer_uid("ipv4:127.0.0.1:54321", proc=tmp_path)
    two = HEADER + row("0100007F:D431", "0100007F:C383", "01", 1000)
    two += row("0100007F:D431", "0100007F:C383", "01", 1001)
    two += row("0100007F:C383", "0100007F:D431", "01", 0)
    with pytest.raises(FailedPrecondition, match="2 candidates"):
        peer_uid("ipv4:127.0.0.1:54321", server_uid=0, proc=write_proc(tmp_path / "p", two))


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc/net/tcp")
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_real_loopback_connection_names_this_process_user(family):
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    try:
        listener = socket.socket(family)
        listener.bind((host, 0))
    except OSError as exc:
        pytest.skip(f"no {host} loopback here: {exc}")
    with listener:
        listener.listen(1)
        with socket.create_connection(listener.getsockname()[:2]) as client:
            accepted, _ = listener.accept()
            with accepted:
                port = client.getsockname()[1]
                peer = (
                    f"ipv4:{host}:{port}" if family == socket.AF_INET else f"ipv6:[{host}]:{port}"
                )
                assert peer_uid(peer) == os.geteuid()
