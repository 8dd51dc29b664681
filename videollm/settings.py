"""Every setting of every service, typed, with its default in exactly one place.

Flags and environment variables are parsed into these objects at the edge (the CLI); the code
below them receives the objects and never reads the environment itself. Each service has its own
environment prefix: VIDEOLLM_ENCODER_*, VIDEOLLM_LLM_*, VIDEOLLM_GATEWAY_* (list values as JSON or
comma-separated, e.g. VIDEOLLM_GATEWAY_ENCODERS=10.0.0.5:50051,10.0.0.6:50051). REDIS_URL is
read as the gateway's redis_url.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1 << 20


def default_model_dir() -> Path:
    """Where the embedded default model lives (built on first use by `videollm serve`)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "videollm" / "tiny-llava-onevision"


def default_video_store_dir() -> Path:
    """Where the gateway keeps uploaded videos, and where an encoder on the same host finds them."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "videollm" / "videos"


def public_settings(settings: BaseModel) -> dict:
    """Every setting in effect, as JSON-ready values, without secrets (fields with repr=False, the
    password of a URL): what the services report in Info and the gateway in /info."""
    values = settings.model_dump(mode="json", exclude={n for n, f in type(settings).model_fields.items() if not f.repr})
    for name, value in values.items():
        if isinstance(value, str) and "://" in value:
            url = urlsplit(value)
            if url.password:
                netloc = f"{url.username or ''}:***@{url.hostname}" + (f":{url.port}" if url.port else "")
                values[name] = urlunsplit(url._replace(netloc=netloc))
    return values


REFERENCE_ENCODER_DEPTH = 26  # prune_layers are given for LLaVA-OneVision's 26-layer SigLIP
INNER_REFERENCE_DEPTH, INNER_REFERENCE_LAYER = 28, 18  # Stage III's published layer, for the 7B's 28 layers


class CompressionSettings(BaseModel):
    """Token compression inside the encoder (EarlyTom, docs/earlytom.md).

    method "none" keeps every token (T*196 + 1). The defaults are the authors' published general
    defaults for LLaVA-OneVision. prune_layers are 0-based indices of the 26-layer encoder; an
    encoder of another depth scales them proportionally (see `scaled_prune_layers`).
    """

    model_config = {"extra": "forbid"}

    method: Literal["none", "earlytom"] = Field("earlytom", description="none sends all T*196+1 tokens")
    retain_ratio: float = Field(0.2, gt=0.0, le=1.0, description="share of the T*196 tokens kept")
    tau: float = Field(0.5, ge=-1.0, le=1.0, description="segment boundary: smoothed similarity below tau")
    max_window: int = Field(6, ge=1, le=1024, description="a segment holds at most max(1, max_window - 1) frames")
    ema: float = Field(0.9, gt=0.0, le=1.0, description="weight of the newest frame in the smoothed similarity")
    prune_layers: list[int] = Field([8, 21, 23], max_length=REFERENCE_ENCODER_DEPTH,
                                    description="encoder layers (0-25) after which frames merge")
    d: float = Field(0.0, ge=0.0, le=1.0, description="share of a dynamic frame's budget for contextual tokens")
    k: int = Field(7, ge=1, le=196, description="neighbours in DPC-KNN density")
    beta: float = Field(0.6, ge=0.0, le=1.0, description="weight of a cluster centre against its members")

    @field_validator("prune_layers")
    @classmethod
    def _layers_in_depth(cls, layers: list[int]) -> list[int]:
        bad = [layer for layer in layers if not 0 <= layer < REFERENCE_ENCODER_DEPTH]
        if bad:
            raise ValueError(f"prune_layers must be encoder layer indices in 0..{REFERENCE_ENCODER_DEPTH - 1}, got {bad}")
        return sorted(set(layers))

    def scaled_prune_layers(self, depth: int) -> list[int]:
        """The prune layers for an encoder with `depth` layers (identity for 26)."""
        return sorted({min(depth - 1, round(layer * depth / REFERENCE_ENCODER_DEPTH)) for layer in self.prune_layers})

    def cache_fields(self) -> dict:
        """What the tokens depend on: every field for EarlyTom, only the method for "none"."""
        return self.model_dump() if self.method == "earlytom" else {"method": "none"}

    def overridden(self, overrides: dict) -> CompressionSettings:
        """These settings with the fields `overrides` names replaced, validated as a whole: the one
        place where a request's settings meet the defaults (in the gateway and in the encoder).
        Raises pydantic's ValidationError when a value is out of range."""
        return type(self).model_validate({**self.model_dump(), **overrides})


class InnerCompressionSettings(BaseModel):
    """EarlyTom Stage III inside the LLM, asked for per request (off unless given).

    At decoder layer `layer` the visual tokens the last prompt token attended to least (share
    `drop_ratio`) are averaged into their most similar kept token. It depends on the question, so
    a request with it never shares a cached video prefix. The authors' 7B default is layer 18 of
    28; an LLM of another depth gets it scaled (`resolve`).
    """

    model_config = {"extra": "forbid"}

    layer: int | None = Field(None, ge=1, le=1024, description="first decoder layer that runs on the shorter "
                              "sequence (default: 18 of 28 layers, scaled to the LLM's depth)")
    drop_ratio: float = Field(0.5, gt=0.0, lt=1.0, description="share of the visual tokens merged away")

    def resolve(self, depth: int) -> InnerCompressionSettings:
        """These settings for an LLM with `depth` decoder layers: the layer filled in and checked."""
        layer = self.layer
        if layer is None:
            layer = min(depth - 1, max(1, round(INNER_REFERENCE_LAYER * depth / INNER_REFERENCE_DEPTH)))
        if not 1 <= layer < depth:
            raise ValueError(f"inner_compression.layer must be in 1..{depth - 1} for this {depth}-layer LLM, "
                             f"got {layer}")
        return self.model_copy(update={"layer": layer})


class _ServiceSettings(BaseSettings):
    model: Path = Field(default_factory=default_model_dir,
                        description="local checkpoint directory (default: the embedded model)")
    host: str = Field("127.0.0.1", description="address to listen on")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on the CPU"
    )
    max_concurrent: int = Field(8, ge=1, description="requests admitted at once; more get RESOURCE_EXHAUSTED")
    tls_cert: Path | None = Field(None, description="PEM certificate chain: serve gRPC over TLS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle: require client certificates (mutual TLS)")
    drain_s: float = Field(30.0, ge=0, description="after SIGTERM: how long the answers in flight may take to "
                           "finish before the process exits (a pod's terminationGracePeriodSeconds must be longer)")
    pull_shm_dir: str = Field("/dev/shm", description="shared-memory directory of same-host hand-offs: an encoder "
                              "leaves token tensors there for an LLM and takes the videos a gateway left there; the "
                              "services must name the same one ('' = off: both go over gRPC)")

    def pull_shm_path(self) -> Path | None:
        return Path(self.pull_shm_dir) if self.pull_shm_dir else None

    def torch_dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.device.startswith("cuda") else "float32"


class EncoderSettings(_ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="VIDEOLLM_ENCODER_", env_nested_delimiter="__", extra="ignore")

    port: int = Field(50051, description="port to listen on")
    metrics_port: int = Field(9101, ge=0, le=65535, description="HTTP port of the Prometheus metrics (queue "
                              "depths, videollm/service_metrics.py); 0 = off")
    default_frames: int = Field(32, ge=1, description="frames sampled when a request names none (at most "
                                "max_frames: a lower max_frames lowers it too unless it is given)")
    max_frames: int = Field(1024, ge=1, description="most frames one request may sample (num_frames, or the cap "
                            "of fps sampling, whose default it is)")
    chunk_frames: int = Field(64, ge=1, description="frames the vision tower and the preprocessing take at once: a "
                              "longer request runs in chunks of this many (the same tokens, bounded device memory), "
                              "and a shorter request arriving meanwhile waits at most one chunk")
    max_frames_in_flight: int = Field(2048, ge=1, description="sampled frames of all requests being decoded or "
                                      "encoded at once (at least max_frames): more wait, so that memory stays "
                                      "bounded however long the requests")
    batch_max_requests: int = Field(1, ge=1, le=64, description="requests whose frames may go through the vision "
                                    "tower together (1 = each alone, the default: batching was measured slower "
                                    "end to end, docs/bench/README.md)")
    batch_max_frames: int = Field(128, ge=1, description="most sampled frames of the requests that share a pass "
                                  "of the vision tower when batch_max_requests > 1 (a longer request runs alone, "
                                  "in chunks)")
    max_video_bytes: int = Field(2048 * MiB, ge=1, description="largest video file accepted (a video sent in "
                                 "chunks is refused on its announced size, before any chunk is read)")
    video_store_dir: str = Field(default_factory=lambda: str(default_video_store_dir()),
                                 description="the gateway's video store (its video_store_dir), when this encoder "
                                 "sees the same directory: an uploaded video is then mapped from its file instead of "
                                 "sent in chunks ('' = off: always chunks)")
    max_duration_s: float = Field(4 * 3600.0, gt=0, description="longest video accepted, in seconds")
    max_frame_pixels: int = Field(3840 * 2160, ge=1, description="width*height of one decoded frame")
    compression: CompressionSettings = CompressionSettings()
    pull_buffer_bytes: int = Field(1024 * MiB, ge=0, description="recent token tensors kept for an LLM to pull "
                                   "straight from this encoder (0 = off: tokens go through the gateway)")
    pull_ttl_s: float = Field(30.0, ge=0, description="how long a token tensor waits for its pull")

    @model_validator(mode="after")
    def _frame_limits(self) -> EncoderSettings:
        if self.default_frames > self.max_frames:
            if "default_frames" in self.model_fields_set:
                raise ValueError(f"default_frames ({self.default_frames}) must be at most max_frames "
                                 f"({self.max_frames})")
            self.default_frames = self.max_frames  # only the limit was given: the default follows it
        if self.max_frames_in_flight < self.max_frames:
            raise ValueError(f"max_frames_in_flight ({self.max_frames_in_flight}) must be at least max_frames "
                             f"({self.max_frames}), or the longest requests could never run")
        return self


class LLMSettings(_ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="VIDEOLLM_LLM_", extra="ignore")

    port: int = Field(50052, description="port to listen on")
    metrics_port: int = Field(9102, ge=0, le=65535, description="HTTP port of the Prometheus metrics (queue "
                              "depths, videollm/service_metrics.py); 0 = off")
    max_concurrent: int = Field(64, ge=1, description="requests admitted at once (decoding or waiting for a "
                                "decode slot); more get RESOURCE_EXHAUSTED")
    decode_slots: int = Field(16, ge=1, le=256, description="requests decoded together (continuous batching); "
                              "each slot holds a KV cache of max_context_tokens")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that names none")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_context_tokens: int = Field(32768, ge=1, description="prompt + visual + completion tokens")
    max_visual_bytes: int = Field(1024 * MiB, ge=1, description="largest visual token tensor accepted")
    prefix_cache_entries: int = Field(8, ge=0, description="KV caches of video prefixes kept for repeat questions")
    pull_timeout_s: float = Field(10.0, gt=0, description="longest wait for visual tokens pulled from an encoder")


def split_list(value):
    """A list setting given as text (a flag, a variable): a JSON list or comma-separated items; the
    items' types are left to the field's validation."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            import json

            return json.loads(value)
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class GatewaySettings(BaseSettings):
    # hide_input_in_errors: a bad value must not echo an API key (or a password in redis_url) in the error
    model_config = SettingsConfigDict(env_prefix="VIDEOLLM_GATEWAY_", extra="ignore", hide_input_in_errors=True)

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    model_name: str = Field("videollm", description="the model name clients pass and /v1/models lists")
    api_keys: Annotated[list[str], NoDecode] = Field(
        [], repr=False, description="keys clients send as 'Authorization: Bearer <key>'; empty = no authentication"
    )
    encoders: Annotated[list[str], NoDecode] = Field(
        ["127.0.0.1:50051"], description="encoder addresses host:port (or dns:///host:port); a name is resolved "
        "every resolve_interval_s and each of its addresses is a replica (each pod of a headless Service)")
    llms: Annotated[list[str], NoDecode] = Field(["127.0.0.1:50052"], description="LLM addresses, as encoders")
    resolve_interval_s: float = Field(3.0, gt=0, description="how often the encoder and LLM names are resolved "
                                      "again (new pods get calls, gone ones stop getting them) and every "
                                      "replica's health is checked")
    redis_url: str | None = Field(
        None, validation_alias=AliasChoices("REDIS_URL", "VIDEOLLM_GATEWAY_REDIS_URL", "redis_url"),
        description="redis://host:port/db of the cache (also $REDIS_URL); none = no cache "
                    "(`videollm serve` starts its own Redis)",
    )
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="lifetime of an encoded video in Redis")
    cache_max_entry_bytes: int = Field(512 * MiB, ge=0, description="larger encodings are not cached")
    upload_ttl_s: int = Field(24 * 3600, ge=1, description="lifetime of an uploaded video")
    max_upload_bytes: int = Field(2048 * MiB, ge=1, description="largest video uploaded to POST /v1/videos "
                                  "(streamed to video_store_dir, never held in memory)")
    max_inline_bytes: int = Field(256 * MiB, ge=1, description="largest video sent inline (a data URL, held in "
                                  "memory; the chat body's limit follows it) or fetched from a URL; larger ones are "
                                  "uploaded and asked about by id")
    video_store_dir: str = Field(default_factory=lambda: str(default_video_store_dir()), min_length=1,
                                 description="directory of the uploaded videos, one file per video named by its "
                                 "id; several gateway replicas must share it (e.g. a ReadWriteMany volume), and an "
                                 "encoder that sees it too maps uploads from it (its own video_store_dir)")
    request_timeout_s: float = Field(600.0, gt=0, description="deadline of one request downstream")
    max_in_flight: int = Field(256, ge=1, description="chat completions in progress; more get 429")
    grpc_tls_ca: Path | None = Field(None, description="PEM CA bundle: reach encoders and LLMs over TLS")
    direct_pull: bool = Field(True, description="on a cache miss, let the LLM take the tokens straight from the "
                              "encoder (one hop instead of two); off whenever grpc_tls_ca is set")
    grpc_tls_cert: Path | None = Field(None, description="PEM client certificate for mutual TLS")
    grpc_tls_key: Path | None = Field(None, description="PEM private key of grpc_tls_cert")
    drain_s: float = Field(30.0, ge=0, description="after SIGTERM: how long the answers in flight may take to "
                           "finish before the process exits (a pod's terminationGracePeriodSeconds must be longer)")
    pull_shm_dir: str = Field("/dev/shm", description="shared-memory directory of same-host hand-offs: a miss's video "
                              "is left there for an encoder on this host to take without gRPC (the encoder's "
                              "pull_shm_dir must name the same one; encoders elsewhere get the bytes; '' = off)")
    fetch_urls: bool = Field(False, description="accept http(s) video URLs (fetched by the gateway)")
    fetch_timeout_s: float = Field(30.0, gt=0, description="time limit of one video download")
    fetch_allow: Annotated[list[str], NoDecode] = Field(
        [], description="networks (CIDR) that URLs may reach although private, e.g. 10.1.2.0/24"
    )
    local_video_roots: Annotated[list[str], NoDecode] = Field(
        [], description="directories whose videos and frames requests may name by file:// URL (symlinks and .. "
                        "resolved; nothing outside them is read); empty = file:// URLs refused")
    presets: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"full": {"method": "none"}, "r0.25": {"retain_ratio": 0.25},
                                 "r0.1": {"retain_ratio": 0.1}},
        description='compression presets served as model names "<model_name>-<name>" (JSON, e.g. {"r0.1": '
                    '{"retain_ratio": 0.1}, "full": {"method": "none"}}): a request naming one gets its compression '
                    "settings unless its videollm.compression says otherwise; {} = none")

    @field_validator("fetch_allow", "local_video_roots", mode="before")
    @classmethod
    def _lists(cls, value):
        return split_list(value)

    @field_validator("presets")
    @classmethod
    def _presets(cls, value):
        for name, overrides in value.items():
            if not name or not all(c.isalnum() or c in "._-" for c in name):
                raise ValueError(f"preset name {name!r}: use letters, digits, '.', '_' and '-'")
            unknown = set(overrides) - set(CompressionSettings.model_fields)
            if unknown:
                raise ValueError(f"preset {name!r}: {sorted(unknown)} are not compression settings; they are "
                                 f"{sorted(CompressionSettings.model_fields)}")
            try:
                CompressionSettings().overridden(overrides)
            except ValidationError as err:
                raise ValueError(f"preset {name!r}: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}") from None
        return value

    def preset_models(self) -> dict[str, dict[str, Any]]:
        """Every model name served -> its compression overrides: the model itself ({}), then the presets."""
        return {self.model_name: {}, **{f"{self.model_name}-{name}": dict(o) for name, o in self.presets.items()}}

    @field_validator("encoders", "llms", mode="before")
    @classmethod
    def _addresses(cls, value):
        value = split_list(value)
        if not value:
            raise ValueError("give at least one address (host:port)")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value):
        keys = split_list(value)
        for number, key in enumerate(keys or [], 1):
            # printable ASCII without spaces, so it can be sent as a Bearer token; the message never shows the key
            if not isinstance(key, str) or not key or not all("!" <= c <= "~" for c in key):
                raise ValueError(f"API key #{number} must be a non-empty string of printable ASCII without spaces")
        return keys

    @property
    def max_body_bytes(self) -> int:
        """The chat body's limit: a base64 data URL is 4/3 of the video, plus the JSON around it."""
        return self.max_inline_bytes * 4 // 3 + 1 * MiB

    @property
    def max_upload_body_bytes(self) -> int:
        """The upload's body limit: the video plus the multipart envelope (boundaries, part headers)."""
        return self.max_upload_bytes + 1 * MiB
