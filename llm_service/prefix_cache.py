"""KV caches of shared prompt prefixes (the chat up to and including the video), kept per replica.

A repeat question about a video that this replica has seen skips both the transfer of the visual
tokens and their prefill: the stored keys and values of the prefix are copied into the request's KV cache slot and only
the question's tokens are prefilled. The key covers the video's identity (the gateway's cache key:
model, video bytes, sampling, compression) and the prompt tokens before the video, so a different
system prompt or history never matches. Entries are evicted least recently used first.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class PrefixKV:
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: keys, values [H_kv, L, dh] (own copies)
    position: int  # rotary position of the first token after the prefix


class PrefixCache:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, PrefixKV] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  # lookups that found their prefix (the tests read it)

    @staticmethod
    def key(video_key: str, prefix_ids: list[int]) -> str:
        digest = hashlib.sha256(video_key.encode())
        digest.update(torch.tensor(prefix_ids, dtype=torch.int64).numpy().tobytes())
        return digest.hexdigest()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: str) -> PrefixKV | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: PrefixKV) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
