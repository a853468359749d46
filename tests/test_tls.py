"""TLS on the gateway's public ports (gRPC and HTTP) and mTLS between gateway and backends."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import dreamsight
import grpc
import pytest
from dreamsight.vision.v1 import vision_pb2_grpc

from dreamsight_server.interceptors import ErrorMappingInterceptor
from dreamsight_server.lifecycle import ServerOptions, TlsFiles
from gateway.config import GatewaySettings
from gateway.server import start_gateway
from tests.certs import Authority
from tests.gateway_helpers import FakeVision, chat_request, new_key, serve_fake_vision


async def test_tls_front_and_mtls_to_backends(tmp_path: Path) -> None:
    ca = Authority(tmp_path)
    backend_pem, gateway_server_pem, gateway_client_pem = (
        ca.issue("backend"),
        ca.issue("gateway-server"),
        ca.issue("gateway-client"),
    )
    # A backend that demands a client certificate signed by the CA.
    backend = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    fake = FakeVision()
    serve_fake_vision(backend, fake)
    tls = TlsFiles(str(backend_pem.cert), str(backend_pem.key), str(ca.pem.cert))
    backend_port = backend.add_secure_port("127.0.0.1:0", tls.server_credentials())
    await backend.start()
    gateway = await start_gateway(
        GatewaySettings(
            vision_target=f"127.0.0.1:{backend_port}",
            diffusion_target=f"127.0.0.1:{backend_port}",
            database=str(tmp_path / "gw.sqlite3"),
            backend_tls_ca=str(ca.pem.cert),
            backend_tls_cert=str(gateway_client_pem.cert),
            backend_tls_key=str(gateway_client_pem.key),
            http_port=0,
            server=ServerOptions(
                metrics_port=None,
                tls=TlsFiles(str(gateway_server_pem.cert), str(gateway_server_pem.key)),
            ),
        )
    )
    try:
        key = await new_key(gateway, "secure", "pro")
        root = ca.pem.cert.read_bytes()
        async with dreamsight.AsyncClient(
            f"localhost:{gateway.port}", api_key=key, tls=True, root_certificates=root
        ) as client:
            reply = await client.chat("", ["hi"])
        assert reply.finish_reason == "stop"
        assert fake.tenants == ["secure"], "the backend heard the gateway over mTLS"

        # Plaintext to the TLS port fails.
        async with dreamsight.AsyncClient(
            f"127.0.0.1:{gateway.port}", api_key=key, retry=dreamsight.RetryPolicy(max_attempts=1)
        ) as plain:
            with pytest.raises(dreamsight.Unavailable):
                await plain.chat("", ["hi"])

        # A caller without the client certificate cannot reach the backend.
        credentials = grpc.ssl_channel_credentials(root)
        async with grpc.aio.secure_channel(f"localhost:{backend_port}", credentials) as direct:
            stub = vision_pb2_grpc.VisionServiceStub(direct)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.Chat(chat_request("hi"), timeout=5):
                    pass
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert fake.tenants == ["secure"]

        # The Ollama/OpenAI HTTP port serves HTTPS with the same certificate.
        assert gateway.http_port is not None
        trusting = ssl.create_default_context(cafile=str(ca.pem.cert))
        body = {"model": "llava-demo", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as http:
            url = f"https://localhost:{gateway.http_port}/api/chat"
            async with http.post(url, json={**body, "stream": False}, headers=headers,
                                 ssl=trusting) as response:  # fmt: skip
                assert response.status == 200, await response.text()
                assert (await response.json())["done"] is True
            with pytest.raises(aiohttp.ClientError):
                await http.get(f"http://localhost:{gateway.http_port}/api/version")
            with pytest.raises(aiohttp.ClientSSLError):  # a CA it does not trust
                await http.get(f"https://localhost:{gateway.http_port}/api/version")
        assert fake.tenants == ["secure", "secure"]
    finally:
        await gateway.stop(0)
        await backend.stop(0)
        await asyncio.sleep(0)
