"""Which keyframes a decoder can start from and still return exactly the frames of a decode from
the start of the stream.

Containers flag as keyframes some frames that are not clean entry points. H.264 marks an I-frame
with a recovery point (open GOPs, intra refresh) as a keyframe, yet the frames after it can
refer to frames before it: a decoder started there returns frames that differ from a sequential
decode (measured on x264's intra refresh; tests/test_video_decode.py). So for H.264 only IDR
frames count. For HEVC every IRAP picture counts (IDR, CRA, BLA): the frames that may refer to
the previous GOP are the leading ones, which are shown before the keyframe and which FFmpeg drops
when it starts at a CRA. Other codecs' keyframes (VP8, VP9, AV1, MPEG-4, MJPEG) are full resets.
"""

from __future__ import annotations

from collections.abc import Iterator

H264_IDR = 5
HEVC_IRAP = range(16, 24)  # BLA_W_LP .. RSV_IRAP_VCL23


def _length_prefixed(packet: bytes, size: int) -> Iterator[int]:
    """The first byte of each NAL unit of an MP4/MKV sample (each unit preceded by its length)."""
    at = 0
    while at + size < len(packet):
        length = int.from_bytes(packet[at : at + size], "big")
        if length == 0 or at + size + length > len(packet):
            return
        yield packet[at + size]
        at += size + length


def _annex_b(packet: bytes) -> Iterator[int]:
    """The first byte of each NAL unit of a byte stream (units after 00 00 01 start codes: MPEG-TS, raw)."""
    at = packet.find(b"\x00\x00\x01")
    while at != -1 and at + 3 < len(packet):
        yield packet[at + 3]
        at = packet.find(b"\x00\x00\x01", at + 3)


def _nal_headers(codec: str, extradata: bytes | None, packet: bytes) -> Iterator[int]:
    if extradata and extradata[0] == 1:  # avcC / hvcC: units carry their length, of 1-4 bytes
        size = (extradata[4] if codec == "h264" else extradata[21]) & 0b11
        return _length_prefixed(packet, size + 1)
    return _annex_b(packet)


def clean_entry(codec: str, extradata: bytes | None, packet: bytes) -> bool:
    """Whether decoding can start at this keyframe packet (codec: FFmpeg's name of the stream's codec)."""
    if codec == "h264":
        return any(header & 0x1F == H264_IDR for header in _nal_headers(codec, extradata, packet))
    if codec == "hevc":
        return any((header >> 1) & 0x3F in HEVC_IRAP for header in _nal_headers(codec, extradata, packet))
    return True
