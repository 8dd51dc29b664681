"""The `videollm` command: run the whole local stack, or one service, or build the default model.

Flags override environment variables, which override the defaults in videollm/settings.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from videollm.flags import SERVICES, add_flags, given_values, serve_flags, service_flags


def _log_setup(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def service_settings(service: str, args: argparse.Namespace):
    """The settings of one service from its flags; flags the user left out come from the
    environment or the defaults."""
    return SERVICES[service](**given_values(args, service_flags(service)))


def cmd_encoder(args: argparse.Namespace) -> None:
    from encoder_service.server import serve

    serve(service_settings("encoder", args))


def cmd_llm(args: argparse.Namespace) -> None:
    from llm_service.server import serve

    serve(service_settings("llm", args))


def cmd_gateway(args: argparse.Namespace) -> None:
    import uvicorn

    from gateway.app import create_app

    settings = service_settings("gateway", args)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level.lower(),
                timeout_graceful_shutdown=settings.drain_s)


def cmd_serve(args: argparse.Namespace) -> None:
    from videollm.stack import run_stack

    sys.exit(run_stack(args))


def cmd_build_tiny_model(args: argparse.Namespace) -> None:
    from videollm.tiny_model import build_tiny_model

    out = build_tiny_model(args.dir)
    print(f"wrote the embedded default model to {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from videollm.evaluation import EvalConfig, EvalError, api_key_from_env, main as eval_main

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request
    models = [name.strip() for name in args.models.split(",") if name.strip()] if args.models else None
    config = EvalConfig(data=args.data, layout=args.layout, url=args.url, models=models, frames=args.frames,
                        max_tokens=args.max_tokens, limit=args.limit, concurrency=args.concurrency,
                        api_key=api_key_from_env(args.api_key), out=args.out)
    try:
        sys.exit(eval_main(config))
    except EvalError as err:  # a missing video, an unknown model, no server: say so, without a traceback
        print(f"videollm eval: {err}", file=sys.stderr)
        sys.exit(2)  # 1 is kept for "every request failed"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videollm", description="Disaggregated video-LLM server")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run gateway, encoder, LLM and Redis locally in one command",
                           description="Every setting of the three services is a flag; a setting that several "
                                       "services have (--model, --device, --max-concurrent) applies to each of them.")
    add_flags(serve, serve_flags())
    serve.set_defaults(func=cmd_serve)

    for service, about in (("encoder", "run the vision encoder gRPC service (default port 50051)"),
                           ("llm", "run the language model gRPC service (default port 50052)"),
                           ("gateway", "run the REST gateway (default 127.0.0.1:8000)")):
        command = sub.add_parser(service, help=about)
        add_flags(command, service_flags(service))
        command.set_defaults(func={"encoder": cmd_encoder, "llm": cmd_llm, "gateway": cmd_gateway}[service])

    bench = sub.add_parser("bench", help="benchmark the stack against transformers (see videollm bench --help)",
                           add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)

    evaluate = sub.add_parser("eval", help="accuracy of every served model name on MVBench or VideoMME through "
                                           "the REST API, scored as lmms-eval scores it")
    evaluate.add_argument("--data", type=Path, required=True, help="the dataset's directory")
    evaluate.add_argument("--layout", required=True, choices=["mvbench", "videomme"],
                          help="mvbench: json/<task>.json and video/...; videomme: videomme.json(l) and data/")
    evaluate.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway")
    evaluate.add_argument("--models", help="comma-separated model names (default: every model GET /v1/models lists; "
                                           "include the full-token one for the 'vs full' column)")
    evaluate.add_argument("--frames", type=_positive, default=16, help="frames sampled per video")
    evaluate.add_argument("--max-tokens", type=_positive, default=16)
    evaluate.add_argument("--limit", type=_positive, help="questions per task file (default: all)")
    evaluate.add_argument("--concurrency", type=_positive, default=4, help="requests at a time")
    evaluate.add_argument("--api-key", help="sent as a Bearer token (default: $VIDEOLLM_API_KEY, else none)")
    evaluate.add_argument("--out", type=Path, help="write every question's result there as JSON")
    evaluate.set_defaults(func=cmd_eval)

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
    parser = build_parser()
    args = parser.parse_args(argv)
    _log_setup(args.log_level)
    try:
        args.func(args)
    except ValidationError as err:  # a flag or variable out of range: say which, without a traceback
        parser.exit(2, f"videollm {args.command}: invalid settings:\n{err}\n")


if __name__ == "__main__":
    main()
