"""Request bodies of the REST API (OpenAI's chat completions format plus the `videollm` object)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, create_model
from pydantic.fields import FieldInfo

from videollm.frame_sampling import UINT32_MAX, FrameSampling
from videollm.settings import CompressionSettings, InnerCompressionSettings


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class VideoURL(BaseModel):
    url: str = Field(description="a data:video/...;base64, URL, the id returned by POST /v1/videos, a file:// "
                                 "URL under the operator's local_video_roots, or an http(s) URL when fetching is on")
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


class ImageURL(BaseModel):
    url: str = Field(description="a data:image/...;base64, URL, or a file:// URL under the operator's "
                                 "local_video_roots")
    detail: str | None = Field(None, description="accepted and ignored: every frame is seen at the model's size")


class ImagePart(BaseModel):
    """One frame of a video sent as images: the image parts of a message, in order, are one video's
    frames (how evaluation tools that sample frames themselves send a video)."""

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | VideoPart | ImagePart, Field(discriminator="type")]


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


def only(allowed: tuple, why: str):
    """A validator for an OpenAI field that does not apply here: values in `allowed` (what leaves the
    answer as it is) pass, anything else is refused with `why`."""

    def check(value):
        if not any(value == permitted for permitted in allowed):
            shown = f"{value!r} is" if isinstance(value, (int, float, str, bool)) else "this value is"
            raise ValueError(f"{shown} not supported: {why}")
        return value

    return check


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion body. Unknown fields are refused, as OpenAI refuses them; OpenAI's
    fields that do not apply to this server are accepted when they leave the answer unchanged (n 1,
    penalties 0, no logprobs, no tools, text responses) and refused when they would change it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="the served model or one of its compression presets (GET /v1/models)")
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
    user: str | None = Field(None, description="accepted and ignored")
    presence_penalty: Annotated[float, AfterValidator(only((0,), "penalties are not applied; send 0 or leave it out"))] = 0.0
    frequency_penalty: Annotated[float, AfterValidator(only((0,), "penalties are not applied; send 0 or leave it out"))] = 0.0
    repetition_penalty: Annotated[float, AfterValidator(only((1,), "penalties are not applied; send 1 or leave it out"))] = 1.0
    logprobs: Annotated[bool | None, AfterValidator(only((False, None), "log probabilities are not returned"))] = None
    top_logprobs: Annotated[int | None, AfterValidator(only((0, None), "log probabilities are not returned"))] = None
    logit_bias: Annotated[dict[str, float] | None,
                          AfterValidator(lambda v: only((None,), "logit biases are not applied")(v or None))] = None
    response_format: Annotated[dict | None, AfterValidator(
        lambda v: only((None, "text"), "only text answers are made")(v.get("type") if v else None))] = None
    tools: Annotated[list | None, AfterValidator(lambda v: only((None,), "tools are not supported")(v or None))] = None
    tool_choice: Annotated[str | dict | None, AfterValidator(
        only((None, "none", "auto"), "tools are not supported"))] = None
    parallel_tool_calls: bool | None = Field(None, description="accepted and ignored (no tools)")
    chat_template_kwargs: dict | None = Field(None, description="accepted and ignored: the model's chat template "
                                              "takes no options (e.g. enable_thinking)")
    store: bool | None = Field(None, description="accepted and ignored: nothing is stored")
    metadata: dict[str, str] | None = Field(None, description="accepted and ignored")
    service_tier: str | None = Field(None, description="accepted and ignored")
    videollm: VideoOptions = VideoOptions()
    media_io_kwargs: MediaIOKwargs | None = Field(None, description="vLLM's spelling of the frame sampling: "
                                                  '{"video": {"num_frames": N, "fps": F}}')

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
