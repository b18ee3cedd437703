"""Run by test_shm_service as root: becomes another user (argv[3]), creates a
segment of its own, and registers it and then argv[2] (a segment of root's)
with the server at argv[1]. Prints one line per registration. Everything is
imported before the switch: the new user may not read this interpreter's files."""

from __future__ import annotations

import _posixshmem
import os
import sys
import uuid

import grpc

from kernelmesh.v1 import shm_pb2, shm_pb2_grpc


def register(stub: shm_pb2_grpc.SharedMemoryServiceStub, name: str, key: str) -> str:
    region = shm_pb2.SharedMemoryRegion(name=name, key=key, byte_size=1024)
    try:
        stub.RegisterSharedMemory(shm_pb2.RegisterSharedMemoryRequest(region=region), timeout=30)
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


def main() -> None:
    target, foreign, uid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    key = f"km-other-user-{uuid.uuid4().hex[:12]}"
    fd = _posixshmem.shm_open("/" + key, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o600)
    try:
        os.ftruncate(fd, 1024)
        # the channel (and so its socket, which names its user) is made as the new user
        with grpc.insecure_channel(target) as channel:
            stub = shm_pb2_grpc.SharedMemoryServiceStub(channel)
            print(f"own {key} {register(stub, 'own', key)}", flush=True)
            print(f"foreign {register(stub, 'theirs', foreign)}", flush=True)
    finally:
        os.close(fd)
        _posixshmem.shm_unlink("/" + key)


if __name__ == "__main__":
    main()
