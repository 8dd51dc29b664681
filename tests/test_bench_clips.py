"""The benchmark's clips are what they say: deterministic, and shaped like phone footage."""

from __future__ import annotations

import io

import av

from bench.clips import CLIPS, PhoneClip, describe, encode_phone_clip


def test_a_phone_clip_is_the_same_bytes_every_time():
    spec = PhoneClip(352, 240, 1.0)
    assert encode_phone_clip(spec) == encode_phone_clip(spec)


def test_a_phone_clip_is_h264_high_with_b_frames_a_fixed_gop_and_about_its_bitrate():
    spec = PhoneClip(352, 240, 4.0, gop_s=1.0, bitrate_mbps=2.0)
    data = encode_phone_clip(spec)
    about = describe(data)
    assert (about["codec"], about["profile"], about["width"], about["height"]) == ("h264", "High", 352, 240)
    assert about["frames"] == 120 and about["keyframes"] == 4  # a keyframe every second, no scene cuts
    assert 1.0 <= about["mbit_per_s"] <= 3.0
    with av.open(io.BytesIO(data)) as container:
        packets = [packet for packet in container.demux(video=0) if packet.size]
    decode_order = [packet.pts for packet in packets]
    assert decode_order != sorted(decode_order)  # B-frames: shown in another order than decoded


def test_the_named_clips_are_the_ones_the_docs_describe():
    assert CLIPS["1080p-30s"] == PhoneClip(1920, 1080, 30.0, gop_s=2.0, bitrate_mbps=16.0)
    assert CLIPS["720p-2min"] == PhoneClip(1280, 720, 120.0, gop_s=1.0, bitrate_mbps=8.0)


def test_an_hdr_phone_clip_is_10_bit_hevc_tagged_with_its_transfer_and_decodes_tone_mapped():
    from encoder_service.video_decode import VideoLimits, decode_video

    data = encode_phone_clip(PhoneClip(352, 240, 1.0, transfer="hlg"))
    assert data == encode_phone_clip(PhoneClip(352, 240, 1.0, transfer="hlg"))
    assert (describe(data)["codec"], describe(data)["profile"]) == ("hevc", "Main 10")
    decoded = decode_video(data, 4, VideoLimits(1 << 30, 3600, 1 << 24))
    assert (decoded.color.transfer, decoded.color.primaries, decoded.color.bit_depth) == ("hlg", "bt2020", 10)
    assert decoded.color.conversion == "tone-mapped to BT.709 SDR"
