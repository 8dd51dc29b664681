"""HDR test clips made from SDR images: the inverse of encoder_service/hdr.py's conversion, so that
an HDR clip of an SDR image should come back as that image (within the quantisation of 10 bits).

SDR code V -> display light (V/255)^2.4 relative to SDR white -> BT.2020 primaries -> 203 cd/m2
per SDR white -> PQ (ST 2084 inverse EOTF) or HLG (inverse OOTF of a 1000 cd/m2 display, then the
OETF) -> Y'CbCr (BT.2020 non-constant luminance, limited range) at 10 bits -> lossless HEVC tagged
with the transfer, BT.2020 primaries and matrix.
"""

from __future__ import annotations

import io

import av
import numpy as np

from encoder_service import hdr

_709_TO_2020 = np.linalg.inv(hdr.BT2020_TO_BT709.astype(np.float64))


def pq_signal(nits: np.ndarray) -> np.ndarray:
    m1, m2, c1, c2, c3 = 2610 / 16384, 2523 / 4096 * 128, 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
    y = np.clip(nits / 10000, 0, 1) ** m1
    return ((c1 + c2 * y) / (1 + c3 * y)) ** m2


def hlg_signal(scene: np.ndarray) -> np.ndarray:
    a, b, c = 0.17883277, 0.28466892, 0.55991073
    return np.where(scene <= 1 / 12, np.sqrt(3 * np.maximum(scene, 0)),
                    a * np.log(np.maximum(12 * scene - b, 1e-12)) + c)


def hdr_signal(sdr: np.ndarray, transfer: int) -> np.ndarray:
    """[H, W, 3] SDR codes 0-255 -> [H, W, 3] R'G'B' signal in [0, 1] (BT.2020 primaries)."""
    nits = ((sdr / 255.0) ** hdr.GAMMA) @ _709_TO_2020.T * hdr.REFERENCE_WHITE
    if transfer == hdr.PQ:
        return pq_signal(nits)
    display = nits / hdr.PEAK
    scene_luminance = np.power(np.maximum(display @ hdr.HLG_LUMA.astype(np.float64), 1e-12), 1 / 1.2)
    return hlg_signal(display / np.power(scene_luminance, 0.2)[..., None])


def yuv420p10(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] R'G'B' in [0, 1] -> yuv420p10le planes [H * 3 / 2, W] (BT.2020 NCL, limited range)."""
    kr, kb = 0.2627, 0.0593
    y = kr * rgb[..., 0] + (1 - kr - kb) * rgb[..., 1] + kb * rgb[..., 2]
    cb, cr = (rgb[..., 2] - y) / (2 * (1 - kb)), (rgb[..., 0] - y) / (2 * (1 - kr))
    height, width = y.shape

    def quarter(plane: np.ndarray) -> np.ndarray:  # 2x2 mean, laid out as FFmpeg's plane rows
        return plane.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3)).reshape(height // 4, width)

    planes = [(219 * y + 16) * 4, quarter((224 * cb + 128) * 4), quarter((224 * cr + 128) * 4)]
    return np.round(np.concatenate(planes)).astype(np.uint16)


def hdr_clip(images: list[np.ndarray], transfer: int, tag_transfer: bool = True) -> bytes:
    """Lossless 10-bit HEVC of SDR images carried as PQ or HLG (tag_transfer False: the same signal
    tagged BT.709, which is what a converter that ignores HDR would see)."""
    name = {hdr.PQ: "smpte2084", hdr.HLG: "arib-std-b67"}[transfer] if tag_transfer else "bt709"
    params = f"log-level=error:lossless=1:colorprim=bt2020:transfer={name}:colormatrix=bt2020nc"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx265", rate=24, options={"x265-params": params})
        stream.width, stream.height, stream.pix_fmt = images[0].shape[1], images[0].shape[0], "yuv420p10le"
        for image in images:
            frame = av.VideoFrame.from_ndarray(yuv420p10(hdr_signal(image.astype(np.float64), transfer)),
                                               format="yuv420p10le")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def ramp_and_bars(height: int = 64, width: int = 256) -> np.ndarray:
    """[H, W, 3] SDR codes: a 16-step grey ramp over the top half, 75% colour bars below."""
    image = np.zeros((height, width, 3))
    image[: height // 2] = np.repeat(np.linspace(0, 255, 16).round(), width // 16)[None, :, None]
    bars = np.array([[191, 191, 191], [191, 191, 0], [0, 191, 191], [0, 191, 0],
                     [191, 0, 191], [191, 0, 0], [0, 0, 191], [0, 0, 0]], dtype=float)
    image[height // 2 :] = np.repeat(bars, width // 8, axis=0)[None]
    return image
