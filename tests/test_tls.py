"""TLS, optionally mutual, on the gRPC links between the gateway and the services."""

from __future__ import annotations

import datetime
import ipaddress

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import GatewayServer, gateway_settings
from encoder_service.server import start as start_encoder
from helpers import data_url, video_chat
from llm_service.server import start as start_llm
from videollm.settings import EncoderSettings, LLMSettings
from videos import make_video


def _certificate(subject: str, issuer_key, issuer_name, key, ca: bool, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, cert, key):
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return path.with_suffix(".crt"), path.with_suffix(".key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "videollm test CA")])
    ca_cert = _certificate("videollm test CA", ca_key, ca_name, ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    files = {"ca": _write(folder / "ca", ca_cert, ca_key)[0]}
    files["server_cert"], files["server_key"] = _write(
        folder / "server", _certificate("server", ca_key, ca_name, server_key, False, sans), server_key)
    files["client_cert"], files["client_key"] = _write(
        folder / "client", _certificate("gateway", ca_key, ca_name, client_key, False), client_key)
    return files


@pytest.fixture(scope="module")
def mutual_tls_services(pki, encoder_service, llm_service, tiny_model_dir):
    tls = {"tls_cert": pki["server_cert"], "tls_key": pki["server_key"], "tls_client_ca": pki["ca"]}
    encoder, _, encoder_port = start_encoder(EncoderSettings(model=tiny_model_dir, port=0, **tls),
                                             encoder_service.engine)
    llm, _, llm_port = start_llm(LLMSettings(model=tiny_model_dir, port=0, **tls), llm_service.engine)
    yield f"127.0.0.1:{encoder_port}", f"127.0.0.1:{llm_port}"
    encoder.stop(None)
    llm.stop(None)


def ask(url: str, seed: int) -> httpx.Response:
    body = video_chat(data_url(make_video("mp4", seed=seed)), max_tokens=4, videollm={"num_frames": 2})
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_a_gateway_with_the_client_certificate_is_served_over_mutual_tls(pki, mutual_tls_services):
    encoder, llm = mutual_tls_services
    settings = gateway_settings([encoder], [llm], None, grpc_tls_ca=pki["ca"], grpc_tls_cert=pki["client_cert"],
                                grpc_tls_key=pki["client_key"])
    with GatewayServer(settings) as gateway:
        response = ask(gateway.url, 111)
        assert response.status_code == 200, response.text
        assert httpx.get(f"{gateway.url}/ready", timeout=10).json()["status"] == "ready"


@pytest.mark.parametrize("client", ["no client certificate", "plaintext"])
def test_a_gateway_without_the_client_certificate_is_refused(pki, mutual_tls_services, client):
    encoder, llm = mutual_tls_services
    tls = {"grpc_tls_ca": pki["ca"]} if client == "no client certificate" else {}
    with GatewayServer(gateway_settings([encoder], [llm], None, **tls)) as gateway:
        response = ask(gateway.url, 112)
        assert response.status_code == 503
        assert httpx.get(f"{gateway.url}/ready", timeout=10).status_code == 503


def test_half_configured_tls_is_a_clear_error(pki, tiny_model_dir, encoder_service):
    with pytest.raises(RuntimeError, match="both tls_cert and tls_key"):
        start_encoder(EncoderSettings(model=tiny_model_dir, port=0, tls_cert=pki["server_cert"]),
                      encoder_service.engine)
