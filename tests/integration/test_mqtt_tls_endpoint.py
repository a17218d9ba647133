"""The embedded MQTT endpoint's TLS listener (MQTTS) with a self-signed server certificate."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from uuid import UUID

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from iiot.adapters import mqtt_codec as mc
from tests.integration.test_mqtt_support import BASE_TS, create_devices, payload
from tests.support import free_port, platform_env, running_platform


def _self_signed(tmp_path, common_name: str = "localhost"):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{common_name}.pem", tmp_path / f"{common_name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_mqtts_listener_takes_telemetry(tmp_path):
    cert, key = _self_signed(tmp_path)
    port, tls_port = free_port(), free_port()
    env = platform_env(
        tmp_path,
        IIOT_MQTT_PORT=str(port),
        IIOT_MQTTS_PORT=str(tls_port),
        IIOT_TLS_CERT=str(cert),
        IIOT_TLS_KEY=str(key),
    )
    async with running_platform(env) as platform:
        [dev] = await create_devices(platform, 1)
        context = ssl.create_default_context(cafile=str(cert))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", tls_port, ssl=context, server_hostname="localhost"
        )
        decoder = mc.Reader(1 << 20, mc.V5)
        writer.write(mc.encode_connect(mc.Connect(mc.V5, "tls-1", username=dev.token)))
        writer.write(mc.encode_publish(mc.V5, "v1/devices/me/telemetry", payload(3), 1, 1))
        packets: list = []
        while len(packets) < 2:
            packets += decoder.feed(await asyncio.wait_for(reader.read(4096), 10))
        assert packets[0].code == 0 and packets[1] == mc.PubAck(1, 0)
        writer.close()
        latest = await platform.services.store.latest(None, UUID(dev.id))
        assert latest["pressure"].ts == BASE_TS + 3
        assert "MQTTS port" in next(c for c in platform.components if c.name == "mqtt").describe()


async def test_a_registered_client_certificate_logs_the_device_in(tmp_path):
    cert, key = _self_signed(tmp_path)
    device_cert, device_key = _self_signed(tmp_path, "device-1")
    stranger_cert, stranger_key = _self_signed(tmp_path, "stranger")
    trusted = tmp_path / "clients.pem"  # self-signed device certificates are their own CA
    trusted.write_bytes(device_cert.read_bytes() + stranger_cert.read_bytes())
    port, tls_port = free_port(), free_port()
    env = platform_env(
        tmp_path,
        IIOT_MQTT_PORT=str(port),
        IIOT_MQTTS_PORT=str(tls_port),
        IIOT_TLS_CERT=str(cert),
        IIOT_TLS_KEY=str(key),
        IIOT_TLS_CLIENT_CA=str(trusted),
    )
    async with running_platform(env) as platform:
        [dev] = await create_devices(platform, 1)
        await platform.services.identity.register_certificate(
            None, UUID(dev.id), device_cert.read_text()
        )
        for client_cert, client_key, expected in [
            (device_cert, device_key, 0),
            (stranger_cert, stranger_key, 0x87),  # not registered to a device: not authorized
        ]:
            context = ssl.create_default_context(cafile=str(cert))
            context.load_cert_chain(str(client_cert), str(client_key))
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", tls_port, ssl=context, server_hostname="localhost"
            )
            decoder = mc.Reader(1 << 20, mc.V5)
            writer.write(mc.encode_connect(mc.Connect(mc.V5, "")))  # no username at all
            writer.write(mc.encode_publish(mc.V5, "v1/devices/me/telemetry", payload(5), 1, 1))
            packets: list = []
            while len(packets) < (2 if expected == 0 else 1):
                data = await asyncio.wait_for(reader.read(4096), 10)
                if not data:
                    break
                packets += decoder.feed(data)
            assert packets[0].code == expected
            writer.close()
        latest = await platform.services.store.latest(None, UUID(dev.id))
        assert latest["pressure"].ts == BASE_TS + 5
