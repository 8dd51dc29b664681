"""Compression settings <-> their protobuf message, in one place for every service."""

from __future__ import annotations

from pydantic import ValidationError

from protos.videollm.v1 import encoder_pb2
from videollm.settings import CompressionSettings

_SCALARS = ("retain_ratio", "tau", "max_window", "ema", "d", "k", "beta")


def compression_to_proto(settings: CompressionSettings) -> encoder_pb2.Compression:
    return encoder_pb2.Compression(
        method=settings.method,
        prune_layers=encoder_pb2.LayerList(layers=settings.prune_layers),
        **{name: getattr(settings, name) for name in _SCALARS},
    )


def compression_from_proto(message: encoder_pb2.Compression, defaults: CompressionSettings) -> CompressionSettings:
    """Fields the message sets override the defaults; an empty method means the defaults.

    Raises ValueError with a readable message when a value is out of range.
    """
    if not message.method:
        return defaults
    values = defaults.model_dump()
    values["method"] = message.method
    values.update({name: getattr(message, name) for name in _SCALARS if message.HasField(name)})
    if message.HasField("prune_layers"):
        values["prune_layers"] = list(message.prune_layers.layers)
    try:
        return CompressionSettings.model_validate(values)
    except ValidationError as err:
        raise ValueError(describe_validation_error(err, "compression")) from err


def describe_validation_error(err: ValidationError, prefix: str) -> str:
    parts = []
    for error in err.errors():
        where = ".".join(str(p) for p in (prefix, *error["loc"]))
        got = error.get("input")
        parts.append(f"{where}: {error['msg']}" + (f" (got {got!r})" if not isinstance(got, dict) else ""))
    return "; ".join(parts)
