"""TLS and mutual TLS on the gRPC port, with certificates made in the test."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kernelmesh.v1 import task_pb2, task_pb2_grpc


@dataclass
class Pem:
    cert: bytes
    key: bytes
    _key: ec.EllipticCurvePrivateKey
    _name: x509.Name


def _make(
    common_name: str, issuer: Pem | None = None, *, ca: bool = False, server: bool = False
) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer._name if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer._key if issuer else key, hashes.SHA256())
    return Pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        key,
        name,
    )


@dataclass
class Pki:
    ca: Pem
    other_ca: Pem
    server: Pem
    client: Pem
    stranger: Pem  # a client certificate from the other CA
    dir: Path

    def write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    ca = _make("kernelmesh test CA", ca=True)
    other = _make("some other CA", ca=True)
    return Pki(
        ca=ca,
        other_ca=other,
        server=_make("kernelmesh server", ca, server=True),
        client=_make("node-1", ca),
        stranger=_make("node-x", other),
        dir=tmp_path_factory.mktemp("pki"),
    )


async def _list_ops(port: int, credentials: grpc.ChannelCredentials | None) -> int:
    target = f"localhost:{port}"
    channel = (
        grpc.aio.secure_channel(target, credentials)
        if credentials
        else grpc.aio.insecure_channel(target)
    )
    async with channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        reply = await stub.ListOps(task_pb2.ListOpsRequest(), timeout=5)
        return len(reply.ops)


async def _refused(port: int, credentials: grpc.ChannelCredentials | None) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _list_ops(port, credentials)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.fixture
async def tls_server(pki, server_config, start_server):
    config = dataclasses.replace(
        server_config,
        tls_cert=pki.write("server.pem", pki.server.cert),
        tls_key=pki.write("server.key", pki.server.key),
    )
    return await start_server(config)


@pytest.fixture
async def mtls_server(pki, server_config, start_server):
    config = dataclasses.replace(
        server_config,
        tls_cert=pki.write("server.pem", pki.server.cert),
        tls_key=pki.write("server.key", pki.server.key),
        tls_client_ca=pki.write("ca.pem", pki.ca.cert),
    )
    return await start_server(config)


async def test_tls_serves_a_client_that_trusts_the_ca(tls_server, pki):
    assert await _list_ops(tls_server.port, grpc.ssl_channel_credentials(pki.ca.cert)) > 0


async def test_tls_is_refused_by_a_client_trusting_another_ca(tls_server, pki):
    await _refused(tls_server.port, grpc.ssl_channel_credentials(pki.other_ca.cert))


async def test_a_plaintext_client_gets_nothing_from_a_tls_port(tls_server):
    await _refused(tls_server.port, None)


async def test_mtls_serves_a_client_certificate_from_the_client_ca(mtls_server, pki):
    credentials = grpc.ssl_channel_credentials(pki.ca.cert, pki.client.key, pki.client.cert)
    assert await _list_ops(mtls_server.port, credentials) > 0


async def test_mtls_refuses_a_client_without_a_certificate(mtls_server, pki):
    await _refused(mtls_server.port, grpc.ssl_channel_credentials(pki.ca.cert))


async def test_mtls_refuses_a_client_certificate_from_another_ca(mtls_server, pki):
    credentials = grpc.ssl_channel_credentials(pki.ca.cert, pki.stranger.key, pki.stranger.cert)
    await _refused(mtls_server.port, credentials)


def test_serve_flags_turn_tls_on(tmp_path, pki, serve_tools):
    import asyncio

    proc = serve_tools.start_serve(
        tmp_path,
        "--no-warmup",
        "--tls-cert",
        pki.write("cli.pem", pki.server.cert),
        "--tls-key",
        pki.write("cli.key", pki.server.key),
    )
    try:
        credentials = grpc.ssl_channel_credentials(pki.ca.cert)
        assert asyncio.run(_list_ops(proc.port, credentials)) > 0
        asyncio.run(_refused(proc.port, None))
    finally:
        serve_tools.stop_serve(proc)


def test_half_a_tls_pair_is_a_usage_error(tmp_path, pki, kernelmesh):
    result = kernelmesh("serve", "--port", "0", "--tls-cert", pki.write("x.pem", pki.server.cert))
    assert result.returncode != 0
    assert "--tls-cert and --tls-key go together" in result.stderr + result.stdout


async def test_the_http_sidecar_serves_https_with_the_same_certificate(tls_server, pki):
    import ssl

    import aiohttp

    context = ssl.create_default_context(cadata=pki.ca.cert.decode())
    url = f"https://localhost:{tls_server.http_port}/health/live"
    async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as r:
        assert r.status == 200
    with pytest.raises(aiohttp.ClientError):  # plain HTTP gets no answer from a TLS port
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://localhost:{tls_server.http_port}/health/live")


def test_the_cli_talks_tls_with_a_ca_bundle(tmp_path, pki, serve_tools, kernelmesh, monkeypatch):
    proc = serve_tools.start_serve(
        tmp_path,
        "--no-warmup",
        "--tls-cert",
        pki.write("cli-ca.pem", pki.server.cert),
        "--tls-key",
        pki.write("cli-ca.key", pki.server.key),
    )
    ca = pki.write("cli-trust.pem", pki.ca.cert)
    other = pki.write("cli-other.pem", pki.other_ca.cert)
    try:
        target = ("--target", proc.target, "--wait", "10")
        trusted = kernelmesh("ops", *target, "--ca-bundle", ca)
        assert trusted.returncode == 0, trusted.stderr
        assert "matmul" in trusted.stdout
        with monkeypatch.context() as env:
            env.setenv("KERNELMESH_CA_BUNDLE", ca)
            by_env = kernelmesh("devices", *target)
        assert by_env.returncode == 0, by_env.stderr
        assert "cpu:0" in by_env.stdout
        briefly = ("--target", proc.target, "--wait", "2")
        for refused in (
            kernelmesh("ops", *briefly, "--ca-bundle", other),
            kernelmesh("ops", *briefly),
        ):
            assert refused.returncode == 1
            assert "no kernelmesh server answered" in refused.stderr
    finally:
        serve_tools.stop_serve(proc)
