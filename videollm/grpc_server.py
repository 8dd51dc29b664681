"""Start-up and shut-down shared by the gRPC services: health checking, ports, draining."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from videollm.settings import MiB

log = logging.getLogger(__name__)

MAX_CONNECTION_AGE_MS = 5 * 60 * 1000
MAX_CONNECTION_AGE_GRACE_MS = 11 * 60 * 1000  # above the gateway's default request_timeout_s of 600 s


def make_server(max_workers: int, max_message_bytes: int) -> tuple[grpc.Server, health.HealthServicer]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", 16 * MiB),
            ("grpc.so_reuseport", 0),
            # a backstop for clients that balance over the pods behind one name: every connection ends
            # after a while (its calls may finish, up to longer than the longest answer), so a client
            # connects again and a new pod gets its share
            ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
            ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
        ],
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


def _read(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise RuntimeError(f"cannot read TLS file {path}: {err.strerror}") from err


def server_credentials(cert, key, client_ca) -> grpc.ServerCredentials | None:
    """TLS when a certificate is given; mutual TLS (client certificates required) when a client CA is too."""
    if cert is None and key is None:
        if client_ca is not None:
            raise RuntimeError("tls_client_ca needs tls_cert and tls_key as well")
        return None
    if cert is None or key is None:
        raise RuntimeError("TLS needs both tls_cert and tls_key")
    return grpc.ssl_server_credentials(
        [(_read(key), _read(cert))],
        root_certificates=_read(client_ca) if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )


def bind(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
    """Listen on host:port (port 0 picks a free one), over TLS when credentials are given; returns the port."""
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"could not listen on {host}:{port}: is the port in use?")
    return bound


def set_serving(health_servicer: health.HealthServicer, service_names: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        health_servicer.set(name, status)


def start_service(settings, max_message_bytes: int, register, service_name: str, label: str, model_id: str):
    """Build, bind (TLS when configured) and start a service's server; returns (server, health, port).

    register(server) adds the service's servicer; settings carries host, port, max_concurrent, tls_*.
    """
    server, health_servicer = make_server(settings.max_concurrent + 4, max_message_bytes)
    register(server)
    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    port = bind(server, settings.host, settings.port, credentials)
    server.start()
    set_serving(health_servicer, [service_name], True)
    log.info("%s serving %s on %s:%d", label, model_id, settings.host, port)
    return server, health_servicer, port


def run_until_signalled(server: grpc.Server, health_servicer: health.HealthServicer, names: list[str], grace_s: float) -> None:
    """Serve until SIGTERM/SIGINT, then report NOT_SERVING and drain in-flight calls."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # a timed wait, so the signal handler always gets to run
        pass
    log.info("shutting down: draining in-flight calls for up to %.0f s", grace_s)
    set_serving(health_servicer, names, False)
    server.stop(grace_s).wait(grace_s + 1)
