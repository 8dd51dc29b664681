"""How a video's frames are turned for display: the container's display matrix.

Phones store portrait video as landscape frames with a display matrix that turns them upright (90
or 270 degrees), and front cameras often mirror it. Players apply the matrix; so must we, or the
model sees the scene on its side. The matrix is stream side data that FFmpeg attaches to every
decoded frame, but the decoders of the keyframe runs are made from the codec alone (see
video_decode), so the orientation is read once from the first frame of the container's own
decoder, beside the runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np

from encoder_service.errors import VideoError

# signs of the matrix's (a, b, c, d) -> (counterclockwise degrees, mirrored left-right after the turn)
_TURNS = {
    (1, 0, 0, 1): (0, False), (0, -1, 1, 0): (90, False), (-1, 0, 0, -1): (180, False), (0, 1, -1, 0): (270, False),
    (-1, 0, 0, 1): (0, True), (0, -1, -1, 0): (90, True), (1, 0, 0, -1): (180, True), (0, 1, 1, 0): (270, True),
}
_FIRST_FRAME_WITHIN = 256  # packets fed to find the first decodable frame


@dataclass(frozen=True)
class Orientation:
    rotation: int = 0  # degrees counterclockwise that a player turns the stored frame: 0, 90, 180 or 270
    mirrored: bool = False  # mirrored left-right after the turn (a front camera)

    def upright(self, frame: np.ndarray) -> np.ndarray:
        """[H, W, 3] as stored -> as displayed (a view, not a copy)."""
        turned = np.rot90(frame, self.rotation // 90)
        return turned[:, ::-1] if self.mirrored else turned


def from_display_matrix(matrix: bytes | None) -> Orientation:
    """FFmpeg's AV_PKT_DATA_DISPLAYMATRIX (nine int32, 16.16 fixed point) -> the orientation; a
    turn that is not a multiple of 90 degrees is refused (no phone writes one)."""
    if matrix is None:
        return Orientation()
    m = np.frombuffer(matrix, dtype=np.int32)
    signs = tuple(int(np.sign(m[i])) for i in (0, 1, 3, 4))
    if signs not in _TURNS:
        raise VideoError("the video's display matrix turns it by an angle that is not a multiple of 90 degrees; "
                         "re-encode it upright")
    rotation, mirrored = _TURNS[signs]
    return Orientation(rotation, mirrored)


def probe(decoder: av.CodecContext, packets: list) -> Orientation:
    """The orientation, from the first frame that the container's own decoder makes of `packets`
    (decode order). Low delay: the first keyframe's frame comes out without waiting for the frames
    that would be reordered before it."""
    decoder.thread_count = 1
    decoder.skip_frame = "DEFAULT"
    decoder.options = {"flags": "low_delay"}
    try:
        for packet in [*packets[:_FIRST_FRAME_WITHIN], None]:
            frames = decoder.decode(packet)
            if frames:
                side_data = frames[0].side_data.get("DISPLAYMATRIX")
                return from_display_matrix(bytes(side_data) if side_data is not None else None)
    except av.FFmpegError:
        pass  # the runs meet the same error and say what it is
    return Orientation()
