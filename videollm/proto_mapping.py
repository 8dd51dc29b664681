"""Frame sampling and compression settings (encoder and Stage III) <-> their protobuf messages, in
one place for every service."""

from __future__ import annotations

from pydantic import ValidationError

from protos.videollm.v1 import encoder_pb2, llm_pb2
from videollm.frame_sampling import FrameSampling
from videollm.settings import CompressionSettings, InnerCompressionSettings

_PROTO_FIELDS = encoder_pb2.Compression.DESCRIPTOR.fields_by_name
# the optional scalars (retain_ratio, tau, ...), read from the settings and the message, so that a new
# setting needs only its proto field; method (empty = the defaults) and prune_layers (a LayerList,
# whose presence tells an empty list from the default) are spelled out below
_SCALARS = tuple(name for name, field in _PROTO_FIELDS.items()
                 if name in CompressionSettings.model_fields and field.has_presence and field.message_type is None)


def compression_to_proto(settings: CompressionSettings) -> encoder_pb2.Compression:
    return encoder_pb2.Compression(
        method=settings.method,
        prune_layers=encoder_pb2.LayerList(layers=settings.prune_layers),
        **{name: getattr(settings, name) for name in _SCALARS},
    )


def compression_overrides(message: encoder_pb2.Compression) -> dict:
    """The settings the message sets, by name; none when its method is empty (= the defaults)."""
    if not message.method:
        return {}
    values = {"method": message.method}
    values.update({name: getattr(message, name) for name in _SCALARS if message.HasField(name)})
    if message.HasField("prune_layers"):
        values["prune_layers"] = list(message.prune_layers.layers)
    return values


def compression_from_proto(message: encoder_pb2.Compression, defaults: CompressionSettings) -> CompressionSettings:
    """Fields the message sets override the defaults; an empty method means the defaults.

    Raises ValueError with a readable message when a value is out of range.
    """
    try:
        return defaults.overridden(compression_overrides(message))
    except ValidationError as err:
        raise ValueError(describe_validation_error(err, "compression")) from err


def sampling_to_proto(sampling: FrameSampling, window_s: tuple[float, float] | None = None) -> encoder_pb2.FrameSampling:
    """window_s: the window as served (a header's), in place of the one asked for."""
    start_s, end_s = window_s if window_s is not None else (sampling.start_s, sampling.end_s)
    return encoder_pb2.FrameSampling(num_frames=sampling.num_frames or 0, fps=sampling.fps or 0.0,
                                     max_frames=sampling.max_frames or 0, start_s=start_s, end_s=end_s)


def sampling_from_proto(message: encoder_pb2.FrameSampling) -> FrameSampling:
    """Raises ValueError with a readable message when a value is out of range."""
    try:
        return FrameSampling(num_frames=message.num_frames or None, fps=message.fps or None,
                             max_frames=message.max_frames or None,
                             start_s=message.start_s if message.HasField("start_s") else None,
                             end_s=message.end_s if message.HasField("end_s") else None)
    except ValidationError as err:
        raise ValueError(describe_validation_error(err, "sampling", FrameSampling)) from err


def sampling_dict(message: encoder_pb2.FrameSampling) -> dict:
    """A header's resolved sampling, as a request's `videollm` object spells it."""
    asked = {"fps": message.fps, "max_frames": message.max_frames} if message.fps else {"num_frames": message.num_frames}
    return {**asked, "start_s": message.start_s, "end_s": message.end_s}


def inner_to_proto(settings: InnerCompressionSettings) -> llm_pb2.InnerCompression:
    return llm_pb2.InnerCompression(layer=settings.layer, drop_ratio=settings.drop_ratio)


def inner_from_proto(message: llm_pb2.InnerCompression) -> InnerCompressionSettings:
    """Raises ValueError with a readable message when a value is out of range."""
    try:
        return InnerCompressionSettings(layer=message.layer if message.HasField("layer") else None,
                                        drop_ratio=message.drop_ratio)
    except ValidationError as err:
        raise ValueError(describe_validation_error(err, "inner_compression", InnerCompressionSettings)) from err


def allowed_range(model: type, name: str) -> str | None:
    """A field's bounds as an interval, read from its constraints: e.g. "(0, 1]"."""
    import annotated_types

    field = model.model_fields.get(name)
    if field is None:
        return None
    low = high = None
    low_bracket, high_bracket = "[", "]"
    for constraint in field.metadata:
        if isinstance(constraint, annotated_types.Gt):
            low, low_bracket = constraint.gt, "("
        elif isinstance(constraint, annotated_types.Ge):
            low = constraint.ge
        elif isinstance(constraint, annotated_types.Lt):
            high, high_bracket = constraint.lt, ")"
        elif isinstance(constraint, annotated_types.Le):
            high = constraint.le
    if low is None and high is None:
        return None
    return f"{low_bracket}{'-inf' if low is None else low}, {'inf' if high is None else high}{high_bracket}"


def error_path(err: ValidationError, prefix: str) -> str:
    first = err.errors()[0] if err.errors() else {"loc": ()}
    return ".".join(str(p) for p in (prefix, *first["loc"]))


def describe_errors(errors: list[dict], prefix: str, model: type = CompressionSettings) -> str:
    """pydantic's errors (locations relative to `model`) as one message that states each field's range."""
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in (prefix, *error["loc"]))
        got = error.get("input")
        bounds = allowed_range(model, str(error["loc"][0])) if error["loc"] else None
        message = f"{where} must be in {bounds}" if bounds and error["type"].endswith(("than", "equal")) else (
            f"{where}: {error['msg']}")
        # the input, unless it is an object or the message quotes it already (our value errors, some of pydantic's)
        echo = not isinstance(got, dict) and error["type"] != "value_error" and "got" not in error["msg"]
        parts.append(message + (f", got {got!r}" if echo else ""))
    return "; ".join(parts)


def describe_validation_error(err: ValidationError, prefix: str, model: type = CompressionSettings) -> str:
    return describe_errors(err.errors(), prefix, model)
