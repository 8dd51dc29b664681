"""Request bodies of the REST API (OpenAI's chat completions format plus the `videollm` object)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model
from pydantic.fields import FieldInfo

from videollm.frame_sampling import UINT32_MAX, FrameSampling
from videollm.settings import CompressionSettings, InnerCompressionSettings


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class VideoURL(BaseModel):
    url: str = Field(description="a data:video/...;base64, URL or the id returned by POST /v1/videos")
    _payload: memoryview | None = PrivateAttr(None)

    @property
    def payload(self) -> memoryview | None:
        """An inline data URL's base64 payload when the body parser left it in the request's bytes
        (gateway/body.py); `url` then ends with ";base64,"."""
        return self._payload

    def leave_payload_in_body(self, url: str, payload: memoryview) -> None:
        self.url, self._payload = url, payload


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | VideoPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Overrides(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def encoder_fields(self) -> dict:
        """The fields the request gives."""
        return self.model_dump(exclude_none=True)


def overrides_of(settings: type[BaseModel], doc: str) -> type[_Overrides]:
    """`settings` with every field optional (None: the default in effect) but with its type, bounds
    and description, so that a new setting reaches REST and the OpenAPI schema by itself. A field's
    own validator (prune_layers' layer range) runs on the merged settings (CompressionSettings.overridden)."""
    fields = {name: (field.annotation | None, FieldInfo.merge_field_infos(field, default=None))
              for name, field in settings.model_fields.items()}
    name = settings.__name__.removesuffix("Settings") + "Overrides"
    return create_model(name, __base__=_Overrides, __doc__=doc, __module__=__name__, **fields)


CompressionOverrides = overrides_of(
    CompressionSettings,
    "Overrides of the encoder's compression defaults, each within its range; a field left out keeps the "
    "encoder's default (videollm.settings.CompressionSettings describes every field's meaning, range and default).",
)


class VideoOptions(FrameSampling):
    """Per-request frame sampling (videollm/frame_sampling.py), token budget and compression."""

    model_config = ConfigDict(extra="forbid")

    max_visual_tokens: int | None = Field(None, ge=1, le=UINT32_MAX, description="a ceiling on the visual tokens: "
                                          "the retain ratio is lowered until the worst case fits (method none: "
                                          "a 400 when the frames cannot fit)")
    compression: CompressionOverrides | None = None
    inner_compression: InnerCompressionSettings | None = Field(
        None, description="EarlyTom Stage III in the LLM (off unless given; such a request never reuses a "
                          "cached video prefix)")


    def sampling(self) -> FrameSampling:
        return FrameSampling(**{name: getattr(self, name) for name in FrameSampling.model_fields})


class VideoIOKwargs(BaseModel):
    """vLLM's per-request video options (`media_io_kwargs.video`), for clients written for vLLM.
    As vLLM reads them: with both num_frames and fps, the fewer frames of the two (here: fps with
    max_frames = num_frames); -1 or 0 = not given (vLLM's num_frames -1, every frame, is the
    server's default here: every frame of a long video would exceed the frame limit)."""

    model_config = ConfigDict(extra="forbid")

    num_frames: int | None = Field(None, ge=-1, le=UINT32_MAX)
    fps: float | None = Field(None, ge=-1)
    max_frames: int | None = Field(None, ge=-1, le=UINT32_MAX)

    def sampling(self) -> FrameSampling:
        """In this server's terms; pydantic's ValidationError for a value out of range."""
        num_frames, fps, max_frames = (value if value and value > 0 else None
                                       for value in (self.num_frames, self.fps, self.max_frames))
        cap = min((v for v in (num_frames, max_frames) if v is not None), default=None)
        return FrameSampling(fps=fps, max_frames=cap) if fps is not None else FrameSampling(num_frames=cap)


class MediaIOKwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    video: VideoIOKwargs | None = None


class ChatCompletionRequest(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (the default)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=UINT32_MAX, description="0 = off")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    user: str | None = None
    videollm: VideoOptions = VideoOptions()
    media_io_kwargs: MediaIOKwargs | None = Field(None, description="vLLM's spelling of the frame sampling: "
                                                  '{"video": {"num_frames": N, "fps": F}}')

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
