"""The `videollm` command: run the whole local stack, or one service, or build the default model.

Flags override environment variables, which override the defaults in videollm/settings.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _log_setup(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _given(args: argparse.Namespace, *names: str) -> dict:
    """Flags the user actually passed (None means: leave it to the environment or the default)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


TLS_FLAGS = ("tls_cert", "tls_key", "tls_client_ca")


def _service_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="local LLaVA-OneVision checkpoint (default: the embedded model)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="default auto")
    parser.add_argument("--max-concurrent", dest="max_concurrent", type=int, help="requests admitted at once")
    parser.add_argument("--tls-cert", dest="tls_cert", type=Path, help="PEM certificate chain: serve over TLS")
    parser.add_argument("--tls-key", dest="tls_key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", dest="tls_client_ca", type=Path,
                        help="PEM CA bundle: require client certificates (mutual TLS)")


def cmd_encoder(args: argparse.Namespace) -> None:
    from encoder_service.server import serve
    from videollm.settings import EncoderSettings

    settings = EncoderSettings(**_given(args, "model", "host", "port", "device", "dtype", "max_concurrent",
                                        "default_frames", "max_frames", "max_video_bytes", *TLS_FLAGS))
    overrides = {name: value for name, value in (("method", args.compression), ("retain_ratio", args.retain_ratio),
                                                 ("prune_layers", args.prune_layers)) if value is not None}
    if overrides:
        settings.compression = settings.compression.model_validate({**settings.compression.model_dump(), **overrides})
    serve(settings)


def cmd_llm(args: argparse.Namespace) -> None:
    from llm_service.server import serve
    from videollm.settings import LLMSettings

    settings = LLMSettings(**_given(args, "model", "host", "port", "device", "dtype", "max_concurrent",
                                    "default_max_tokens", "max_tokens_limit", "max_context_tokens", "decode_slots",
                                    *TLS_FLAGS))
    serve(settings)


def gateway_settings(args: argparse.Namespace):
    from videollm.settings import GatewaySettings

    names = ["host", "port", "encoders", "llms", "redis_url", "model_name", "cache_ttl_s", "max_upload_bytes",
             "max_frames", "request_timeout_s", "api_keys"]
    if hasattr(args, "grpc_tls_ca"):  # `videollm gateway` only: `serve` runs its services without TLS
        names += ["grpc_tls_ca", "grpc_tls_cert", "grpc_tls_key"]
    return GatewaySettings(**_given(args, *names))


def cmd_gateway(args: argparse.Namespace) -> None:
    import uvicorn

    from gateway.app import create_app

    settings = gateway_settings(args)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level.lower(),
                timeout_graceful_shutdown=30)


def cmd_serve(args: argparse.Namespace) -> None:
    from videollm.stack import run_stack

    sys.exit(run_stack(args))


def cmd_build_tiny_model(args: argparse.Namespace) -> None:
    from videollm.tiny_model import build_tiny_model

    out = build_tiny_model(args.dir)
    print(f"wrote the embedded default model to {out}")


def _gateway_flags(parser: argparse.ArgumentParser, with_addresses: bool) -> None:
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    if with_addresses:
        parser.add_argument("--encoders", help="comma-separated encoder addresses host:port")
        parser.add_argument("--llms", help="comma-separated LLM addresses host:port")
    parser.add_argument("--redis-url", dest="redis_url", help="redis://host:port/db (default: $REDIS_URL)")
    parser.add_argument("--model-name", dest="model_name", help="the model name clients use (default videollm)")
    parser.add_argument("--cache-ttl-s", dest="cache_ttl_s", type=int, help="lifetime of a cached encoding")
    parser.add_argument("--max-upload-bytes", dest="max_upload_bytes", type=int, help="largest video accepted")
    parser.add_argument("--max-frames", dest="max_frames", type=int, help="largest num_frames a request may ask for")
    parser.add_argument("--request-timeout-s", dest="request_timeout_s", type=float, help="deadline downstream")
    if with_addresses:
        parser.add_argument("--grpc-tls-ca", dest="grpc_tls_ca", type=Path, help="PEM CA: reach the services over TLS")
        parser.add_argument("--grpc-tls-cert", dest="grpc_tls_cert", type=Path, help="PEM client certificate (mTLS)")
        parser.add_argument("--grpc-tls-key", dest="grpc_tls_key", type=Path, help="PEM key of --grpc-tls-cert")
    parser.add_argument("--api-keys", dest="api_keys", metavar="KEYS",
                        help="comma-separated keys clients must send as 'Authorization: Bearer <key>' "
                             "(default: none, no authentication); VIDEOLLM_GATEWAY_API_KEYS keeps them out of ps")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videollm", description="Disaggregated video-LLM server")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run gateway, encoder, LLM and Redis locally in one command")
    _gateway_flags(serve, with_addresses=False)
    serve.add_argument("--model", type=Path, help="checkpoint for both services (default: the embedded model)")
    serve.add_argument("--device", help="device for both services (default cpu)")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.set_defaults(func=cmd_serve)

    encoder = sub.add_parser("encoder", help="run the vision encoder gRPC service (default port 50051)")
    _service_flags(encoder)
    encoder.add_argument("--default-frames", dest="default_frames", type=int, help="frames sampled by default (32)")
    encoder.add_argument("--max-frames", dest="max_frames", type=int, help="largest num_frames accepted (64)")
    encoder.add_argument("--max-video-bytes", dest="max_video_bytes", type=int, help="largest video accepted")
    encoder.add_argument("--compression", choices=["none", "earlytom"], help="default compression (earlytom)")
    encoder.add_argument("--retain-ratio", dest="retain_ratio", type=float, help="default EarlyTom retain ratio (0.2)")
    encoder.add_argument("--prune-layers", dest="prune_layers", type=lambda text: [int(x) for x in text.split(",")],
                         help="default EarlyTom prune layers of the 26-layer encoder, e.g. 8,21,23")
    encoder.set_defaults(func=cmd_encoder)

    llm = sub.add_parser("llm", help="run the language model gRPC service (default port 50052)")
    _service_flags(llm)
    llm.add_argument("--default-max-tokens", dest="default_max_tokens", type=int, help="when a request gives none")
    llm.add_argument("--max-tokens-limit", dest="max_tokens_limit", type=int, help="largest max_tokens accepted")
    llm.add_argument("--max-context-tokens", dest="max_context_tokens", type=int,
                     help="prompt + visual + completion tokens (the length of each KV cache slot)")
    llm.add_argument("--decode-slots", dest="decode_slots", type=int,
                     help="requests decoded together (continuous batching), default 16")
    llm.set_defaults(func=cmd_llm)

    gateway = sub.add_parser("gateway", help="run the REST gateway (default 127.0.0.1:8000)")
    _gateway_flags(gateway, with_addresses=True)
    gateway.set_defaults(func=cmd_gateway)

    bench = sub.add_parser("bench", help="benchmark the stack against transformers (see videollm bench --help)",
                           add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)

    tiny = sub.add_parser("build-tiny-model", help="write the embedded default model to DIR")
    tiny.add_argument("dir", type=Path)
    tiny.set_defaults(func=cmd_build_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its flags are bench.run's own
        from bench.run import main as bench_main

        logging.basicConfig(level="WARNING")
        sys.exit(bench_main(argv[1:]))
    args = build_parser().parse_args(argv)
    _log_setup(args.log_level)
    args.func(args)


if __name__ == "__main__":
    main()
