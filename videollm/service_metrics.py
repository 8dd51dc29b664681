"""The encoder's and the LLM's Prometheus metrics, each on an HTTP port of its own (`metrics_port`):
the queue depths an autoscaler scales each stage on (KEDA's Prometheus trigger), which GPU
utilisation cannot tell (a GPU is busy whether one request or a hundred wait for it).

Every value is read from the engine when Prometheus scrapes (Gauge.set_function): nothing on the
request path counts for the metrics' sake.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Gauge, start_http_server

log = logging.getLogger(__name__)


def _gauges(specs: list[tuple[str, str, object]]) -> CollectorRegistry:
    registry = CollectorRegistry()
    for name, documentation, read in specs:
        Gauge(name, documentation, registry=registry).set_function(read)
    return registry


def encoder_registry(engine) -> CollectorRegistry:
    """engine: encoder_service.engine.EncoderEngine."""
    return _gauges([
        ("videollm_encoder_requests_in_flight", "Encode calls admitted: decoding, waiting or in the tower",
         lambda: engine.requests_in_flight),
        ("videollm_encoder_requests_waiting", "requests waiting for room among the frames in flight or for the tower",
         lambda: engine.frames_in_flight.waiting + engine.batcher.waiting),
        ("videollm_encoder_frames_in_flight", "sampled frames of the requests being decoded or encoded",
         lambda: engine.frames_in_flight.taken),
        ("videollm_encoder_frames_queued", "sampled frames of the requests waiting for the tower",
         lambda: engine.batcher.frames_waiting),
        ("videollm_encoder_encodes_completed", "successful encodes since start", lambda: engine.encodes_completed),
    ])


def llm_registry(engine) -> CollectorRegistry:
    """engine: llm_service.engine.LLMEngine."""
    return _gauges([
        ("videollm_llm_requests_in_flight", "Generate calls admitted: waiting for a decode slot or decoding",
         lambda: engine.requests_in_flight),
        ("videollm_llm_requests_waiting", "requests waiting for a decode slot", lambda: engine.batcher.waiting),
        ("videollm_llm_kv_slots_in_use", "decode slots (KV caches) in use", lambda: engine.batcher.active),
        ("videollm_llm_kv_slots", "decode slots (KV caches) in all", lambda: engine.settings.decode_slots),
        ("videollm_llm_generations_completed", "answers since start", lambda: engine.generations_completed),
    ])


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int | None:
    """Serve the registry at http://host:port/metrics (a thread of its own); the port, None when off
    (port 0) or taken. A taken port is logged, not fatal: a second replica on one host must not
    fail to serve for its metrics' sake (give each its own port, or 0)."""
    if not port:
        return None
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        log.error("metrics are off: cannot listen on %s:%d (%s); set metrics_port to a free port", host, port, err)
        return None
    log.info("metrics at http://%s:%d/metrics", host, server.server_port)
    return server.server_port
