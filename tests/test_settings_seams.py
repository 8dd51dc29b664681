"""Each compression and frame setting is defined once, in videollm/settings.py, and everything else
follows it: the REST schema (and its OpenAPI), the proto mapping, the merge of a request's settings
with the defaults, and the frame limit's check.

These fail when a new setting is added to CompressionSettings but cannot reach a request or the
encoder, or when a copy drifts from the definition.
"""

from __future__ import annotations

import annotated_types
import pytest
from pydantic import ValidationError

from gateway.app import create_app
from gateway.errors import APIError
from gateway.requests import VideoRequest
from gateway.schemas import CompressionOverrides
from gateway.videos import Video
from protos.videollm.v1 import encoder_pb2
from videollm.proto_mapping import compression_from_proto, compression_overrides, compression_to_proto
from videollm.frame_sampling import FrameSampling
from videollm.settings import CompressionSettings, EncoderSettings, GatewaySettings

# a valid value other than the default for every compression setting
NON_DEFAULT = {"method": "none", "retain_ratio": 0.35, "tau": -0.25, "max_window": 9, "ema": 0.55,
               "prune_layers": [2, 14], "d": 0.3, "k": 11, "beta": 0.15}
BOUNDS = (annotated_types.Gt, annotated_types.Ge, annotated_types.Lt, annotated_types.Le, annotated_types.MaxLen)


def test_every_setting_has_a_non_default_value_here():
    assert set(NON_DEFAULT) == set(CompressionSettings.model_fields), "give a new setting a value in NON_DEFAULT"
    defaults = CompressionSettings()
    for name, value in NON_DEFAULT.items():
        assert getattr(defaults, name) != value, name
    CompressionSettings(**NON_DEFAULT)  # all valid


# -- REST -----------------------------------------------------------------------------------------


def test_rest_has_every_compression_setting_optional_with_its_bounds_and_description():
    rest, settings = CompressionOverrides.model_fields, CompressionSettings.model_fields
    assert list(rest) == list(settings)
    for name, field in settings.items():
        override = rest[name]
        assert override.default is None and not override.is_required(), name
        assert override.description == field.description, name
        assert [m for m in override.metadata if isinstance(m, BOUNDS)] == [
            m for m in field.metadata if isinstance(m, BOUNDS)], name
    assert CompressionOverrides(**NON_DEFAULT).encoder_fields() == NON_DEFAULT
    assert CompressionOverrides().encoder_fields() == {}
    with pytest.raises(ValidationError):
        CompressionOverrides(colour="red")


def test_the_openapi_schema_shows_each_compression_settings_range():
    schema = create_app(GatewaySettings()).openapi()["components"]["schemas"]["CompressionOverrides"]
    assert schema["additionalProperties"] is False
    properties = schema["properties"]
    assert set(properties) == set(CompressionSettings.model_fields)
    retain = next(s for s in properties["retain_ratio"]["anyOf"] if s.get("type") == "number")
    assert (retain["exclusiveMinimum"], retain["maximum"]) == (0, 1)
    k = next(s for s in properties["k"]["anyOf"] if s.get("type") == "integer")
    assert (k["minimum"], k["maximum"]) == (1, 196)
    for name, field in CompressionSettings.model_fields.items():
        assert properties[name]["description"] == field.description, name
        shown = {key for s in properties[name]["anyOf"] for key in s}
        for constraint in field.metadata:
            key = {annotated_types.Gt: "exclusiveMinimum", annotated_types.Ge: "minimum",
                   annotated_types.Lt: "exclusiveMaximum", annotated_types.Le: "maximum",
                   annotated_types.MaxLen: "maxItems"}.get(type(constraint))
            assert key is None or key in shown, (name, key)


# -- proto ----------------------------------------------------------------------------------------


def test_every_setting_is_a_field_of_the_proto_message():
    assert set(CompressionSettings.model_fields) <= set(encoder_pb2.Compression.DESCRIPTOR.fields_by_name)


@pytest.mark.parametrize("name", list(NON_DEFAULT))
def test_each_setting_travels_through_the_proto_and_back(name):
    settings = CompressionSettings().overridden({name: NON_DEFAULT[name]})
    message = compression_to_proto(settings)
    assert compression_overrides(message)[name] == NON_DEFAULT[name]
    assert compression_from_proto(message, CompressionSettings()) == settings
    back = compression_from_proto(encoder_pb2.Compression.FromString(message.SerializeToString()), CompressionSettings())
    assert getattr(back, name) == NON_DEFAULT[name]


def test_all_settings_at_once_travel_through_the_proto_and_back():
    settings = CompressionSettings(**NON_DEFAULT)
    assert compression_overrides(compression_to_proto(settings)) == NON_DEFAULT
    assert compression_from_proto(compression_to_proto(settings), CompressionSettings()) == settings


def test_a_message_sets_only_what_it_names_and_an_empty_method_means_the_defaults():
    defaults = CompressionSettings(retain_ratio=0.3)
    message = encoder_pb2.Compression(method="earlytom", tau=0.1, prune_layers=encoder_pb2.LayerList(layers=[]))
    assert compression_overrides(message) == {"method": "earlytom", "tau": 0.1, "prune_layers": []}
    merged = compression_from_proto(message, defaults)
    assert (merged.retain_ratio, merged.tau, merged.prune_layers) == (0.3, 0.1, [])
    assert compression_from_proto(encoder_pb2.Compression(tau=0.1), defaults) == defaults
    with pytest.raises(ValueError, match=r"compression\.retain_ratio must be in \(0\.0, 1\.0\]"):
        compression_from_proto(encoder_pb2.Compression(method="earlytom", retain_ratio=3), defaults)


# -- the merge and the frame limit ----------------------------------------------------------------


def test_overrides_replace_only_the_fields_they_name_and_are_checked_on_the_whole():
    defaults = CompressionSettings(k=5)
    merged = defaults.overridden({"retain_ratio": 0.1, "prune_layers": [21, 8, 8]})
    assert merged == CompressionSettings(k=5, retain_ratio=0.1, prune_layers=[8, 21])
    assert defaults.overridden({}) == defaults
    with pytest.raises(ValidationError, match="prune_layers"):
        defaults.overridden({"prune_layers": [26]})


def test_the_gateway_takes_the_frame_settings_from_the_encoder():
    assert "max_frames" not in GatewaySettings.model_fields and "default_frames" not in GatewaySettings.model_fields
    encoder = EncoderSettings(max_frames=24, default_frames=6, compression={"retain_ratio": 0.3})
    info = encoder_pb2.EncoderInfo(model_id="m", default_frames=encoder.default_frames, max_frames=encoder.max_frames,
                                   default_compression=compression_to_proto(encoder.compression))
    video = Video.of(b"not a video")
    job = VideoRequest(video, FrameSampling(), {"tau": 0.2}).resolve(info)
    assert job.sampling.num_frames == 6
    assert job.compression == encoder.compression.overridden({"tau": 0.2})
    assert VideoRequest(video, FrameSampling(num_frames=24), {}).resolve(info).sampling.num_frames == 24
    assert VideoRequest(video, FrameSampling(fps=2.0), {}).resolve(info).sampling.max_frames == 24  # fps's cap
    with pytest.raises(APIError) as refused:
        VideoRequest(video, FrameSampling(num_frames=25), {}).resolve(info)
    assert (refused.value.status, refused.value.param) == (400, "videollm.num_frames")
    assert refused.value.message == "videollm.num_frames: must be at most 24 (the server's frame limit), got 25"
