"""HDR frames (PQ or HLG, BT.2020) -> the 8-bit BT.709 SDR frames the model was trained on.

Recent phones record HDR by default: iPhones write 10-bit HEVC with the HLG transfer, and PQ
(HDR10) comes from cameras and edits. Converted like SDR, such a frame comes out flat and washed
out. Per pixel, after swscale has turned Y'CbCr into R'G'B' with the frame's own BT.2020 matrix:

1. To display light, relative to HDR reference white (203 cd/m2, ITU-R BT.2408), which becomes
   SDR white:
   - PQ: the ST 2084 EOTF.
   - HLG: the BT.2100 inverse OETF, then the OOTF of a 1000 cd/m2 display (gamma 1.2).
2. BT.2020 to BT.709 primaries: a 3x3 matrix in linear light, with colours outside BT.709 clipped
   (ITU-R BT.2087).
3. Tone mapping, per channel. Below the knee (0.9 of SDR white) the value is unchanged, so
   content graded within SDR's range keeps its SDR values. Above it, an extended Reinhard curve
   rolls highlights off so that the source's peak (1000 cd/m2 unless told otherwise) lands on
   SDR white; SDR white itself lands at 0.95.
4. The BT.1886 display gamma inverted (V = L^(1/2.4)), 8 bits, as SDR video is coded.

The one-value steps go through look-up tables (65,536 entries), so a frame costs a few gathers
and a few array operations, in torch: on the GPU next to the resizing when the encoder runs there
(the frames cross as 16-bit R'G'B'), on the CPU in the decoding runs otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

PQ, HLG = 16, 18  # FFmpeg's AVColorTransferCharacteristic of SMPTE ST 2084 and ARIB STD-B67
TRANSFER_NAMES = {1: "bt709", 6: "bt601", 13: "srgb", 14: "bt2020-10", 15: "bt2020-12", PQ: "pq", HLG: "hlg"}
PRIMARY_NAMES = {1: "bt709", 5: "bt470bg", 6: "smpte170m", 9: "bt2020", 11: "dci-p3", 12: "display-p3"}
REFERENCE_WHITE = 203.0  # cd/m2: HDR reference white, which SDR white stands for (BT.2408)
PEAK = 1000.0  # cd/m2: the source's peak when the file does not say; also the HLG display's peak
KNEE = 0.9  # relative to SDR white: below it the tone mapping changes nothing
GAMMA = 2.4  # BT.1886
# BT.2020 -> BT.709 primaries, linear light (BT.2087)
BT2020_TO_BT709 = np.array([[1.6605, -0.5876, -0.0728],
                            [-0.1246, 1.1329, -0.0083],
                            [-0.0182, -0.1006, 1.1187]], dtype=np.float32)
HLG_LUMA = np.array([0.2627, 0.6780, 0.0593], dtype=np.float32)  # BT.2020 luminance weights


def is_hdr(transfer: int) -> bool:
    return transfer in (PQ, HLG)


@dataclass(frozen=True)
class ColorReport:
    """What the answer's `source.color` says: the source's tags and what was done to the frames."""

    transfer: str
    primaries: str
    bit_depth: int
    conversion: str  # "none" | "tone-mapped to BT.709 SDR"

    @classmethod
    def of(cls, transfer: int, primaries: int, bit_depth: int) -> ColorReport:
        return cls(TRANSFER_NAMES.get(transfer, "unspecified" if transfer == 2 else f"other ({transfer})"),
                   PRIMARY_NAMES.get(primaries, "unspecified" if primaries == 2 else f"other ({primaries})"),
                   bit_depth, "tone-mapped to BT.709 SDR" if is_hdr(transfer) else "none")


def pq_to_nits(signal: np.ndarray) -> np.ndarray:
    """ST 2084 EOTF: non-linear signal in [0, 1] -> display light in cd/m2."""
    m1, m2, c1, c2, c3 = 2610 / 16384, 2523 / 4096 * 128, 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
    powered = np.power(np.clip(signal, 0, 1), 1 / m2)
    return 10000 * np.power(np.maximum(powered - c1, 0) / (c2 - c3 * powered), 1 / m1)


def hlg_to_scene(signal: np.ndarray) -> np.ndarray:
    """BT.2100 HLG inverse OETF: non-linear signal in [0, 1] -> scene light in [0, 1]."""
    a, b, c = 0.17883277, 0.28466892, 0.55991073
    signal = np.clip(signal, 0, 1)
    with np.errstate(over="ignore"):
        high = (np.exp((signal - c) / a) + b) / 12
    return np.where(signal <= 0.5, signal * signal / 3, high)


def tone_map(relative: np.ndarray, peak: float = PEAK) -> np.ndarray:
    """Light relative to SDR white -> [0, 1]: unchanged below KNEE, then an extended Reinhard
    roll-off that reaches 1 at `peak` (cd/m2)."""
    top = (peak / REFERENCE_WHITE - KNEE) / (1 - KNEE)
    over = np.maximum(relative - KNEE, 0) / (1 - KNEE)
    rolled = KNEE + (1 - KNEE) * over / (1 + over) * (1 + top) / top
    return np.clip(np.where(relative <= KNEE, relative, rolled), 0, 1)


_INDEX = 65535  # 16-bit tables


@cache
def _tables(transfer: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(16-bit R'G'B' code -> linear light, sqrt(light / top) at 16 bits -> 8-bit SDR code, the
    BT.2020 -> BT.709 matrix, the BT.2020 luminance weights) on `device`. Linear light is relative
    to reference white for PQ and scene light for HLG; the square root spends the second table's
    resolution where 8-bit codes are densest, near black."""
    signal = np.arange(_INDEX + 1, dtype=np.float64) / _INDEX
    linear = pq_to_nits(signal) / REFERENCE_WHITE if transfer == PQ else hlg_to_scene(signal)
    relative = signal ** 2 * (PEAK / REFERENCE_WHITE)
    code = np.round(np.power(tone_map(relative), 1 / GAMMA) * 255)
    return (torch.from_numpy(linear.astype(np.float32)).to(device), torch.from_numpy(code.astype(np.uint8)).to(device),
            torch.from_numpy(BT2020_TO_BT709.T.copy()).to(device), torch.from_numpy(HLG_LUMA).to(device))


def to_sdr(rgb48: torch.Tensor, transfer: int) -> torch.Tensor:
    """[..., 3] uint16 R'G'B' (BT.2020 primaries, PQ or HLG) -> [..., 3] uint8 BT.709 SDR, on its device."""
    to_linear, to_code, gamut, luma = _tables(transfer, rgb48.device)
    linear = to_linear[rgb48.to(torch.int32)]  # [..., 3] float32
    if transfer == HLG:  # OOTF of a PEAK display: Fd = PEAK * Ys^(gamma - 1) * E, relative to reference white
        luminance = linear @ luma  # [...]
        linear *= (PEAK / REFERENCE_WHITE * luminance.pow(0.2)).unsqueeze(-1)
    top = PEAK / REFERENCE_WHITE
    light = linear @ gamut  # BT.709 primaries; in place from here on
    light.clamp_(0, top).mul_(1 / top).sqrt_().mul_(_INDEX).add_(0.5)
    return to_code[light.to(torch.int32)]
