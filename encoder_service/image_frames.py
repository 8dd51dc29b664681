"""Frames sent as still images (EncodeRequest.image_sizes) -> the frames of a video, in order.

Evaluation tools that sample a video themselves (lmms-eval without pass_video_url, VLMEvalKit's API
mode) send its frames as images. They are taken as they are: every image is a frame, none is
dropped or repeated, and they go through the same preprocessing, tower and EarlyTom as a decoded
video's frames. They must share one size, as a video's frames do. Images are decoded by FFmpeg
(PyAV), like videos, so any format it reads as a still image works (PNG, JPEG, WebP, BMP...).
"""

from __future__ import annotations

import io
import mmap
from collections.abc import Callable

import av
import numpy as np

from encoder_service.errors import VideoError
from encoder_service.video_decode import Allocate, DecodedVideo, VideoLimits


def decode_images(data: bytes | mmap.mmap, sizes: list[int], limits: VideoLimits, allocate: Allocate,
                  admit: Callable[[list[int]], None]) -> DecodedVideo:
    """`data` holds len(sizes) images back to back. admit(indices) is called before any is decoded,
    as decode_video does (it may refuse them). Raises VideoError for an image that cannot be read,
    breaks the limits, or differs in size from the first."""
    if not sizes:
        raise VideoError("no images were sent")
    if sum(sizes) != len(data):
        raise VideoError(f"the images' sizes add up to {sum(sizes)} bytes but {len(data)} bytes arrived")
    if len(data) > limits.max_bytes:
        raise VideoError(f"the images are {len(data)} bytes together; the limit is {limits.max_bytes} bytes")
    admit(list(range(len(sizes))))
    frames: np.ndarray | None = None  # [T, H, W, 3] uint8
    offset = 0
    for number, size in enumerate(sizes, 1):
        image = data[offset : offset + size]
        offset += size
        rgb = _decode_one(image, number, limits)  # [H, W, 3]
        if frames is None:
            frames = allocate((len(sizes), *rgb.shape), np.dtype(np.uint8))
        elif rgb.shape != frames.shape[1:]:
            raise VideoError(f"image {number} is {rgb.shape[1]}x{rgb.shape[0]} but image 1 is {frames.shape[2]}x"
                             f"{frames.shape[1]}: a video's frames share one size, so send them at one size")
        frames[number - 1] = rgb
    count = len(sizes)
    return DecodedVideo(frames, list(range(count)), count, fps=0.0, duration_s=0.0)


def _decode_one(image: bytes, number: int, limits: VideoLimits) -> np.ndarray:
    try:
        with av.open(io.BytesIO(image)) as container:
            if not container.streams.video:
                raise VideoError(f"image {number} has no picture")
            stream = container.streams.video[0]
            if stream.codec_context.width * stream.codec_context.height > limits.max_frame_pixels:
                raise VideoError(f"image {number} is {stream.codec_context.width}x{stream.codec_context.height}, over "
                                 f"the limit of {limits.max_frame_pixels} pixels per frame")
            frame = next(container.decode(stream), None)
    except av.FFmpegError as err:
        raise VideoError(f"image {number} is not a readable image: {err}") from err
    if frame is None:
        raise VideoError(f"image {number} is not a readable image: it has no picture")
    return frame.to_ndarray(format="rgb24")
