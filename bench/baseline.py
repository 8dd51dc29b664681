"""The baseline: transformers' monolithic LlavaOnevisionForConditionalGeneration, full tokens.

The same video bytes, the same frame sampling and decoder (encoder_service.video_decode), the same
processor and prompt; timed in-process with CUDA synchronisation, one request at a time (how a
plain transformers deployment serves).

Its throughput under concurrent clients is either measured (`Monolithic.generate` behind
bench/baseline_server.py, an HTTP front that serves one request at a time, driven by the same
closed-loop clients as videollm) or modeled from one measured request (`queueing`, formula in
MODELED_FORMULA); bench/run.py's --baseline-throughput chooses, and every entry says which it is
in its "kind".
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from encoder_service.video_decode import VideoLimits, decode_video

PROMPT = "Describe what happens in this video, scene by scene."
TOKENS_PER_FRAME = 196  # LLaVA-OneVision's tokens per video frame (729 patches pooled 2x2); a video adds one newline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Monolithic:
    def __init__(self, model_dir: Path, device: str, dtype: torch.dtype):
        from transformers import AutoTokenizer, AutoVideoProcessor, LlavaOnevisionForConditionalGeneration

        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.init()  # a fresh process (the baseline server) has no CUDA state to reset before this
            torch.cuda.reset_peak_memory_stats(self.device)
        self.model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(self.device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.processor = AutoVideoProcessor.from_pretrained(model_dir)
        self.video_id = self.model.config.video_token_id
        self.limits = VideoLimits(1 << 31, 1e6, 1 << 30)

    def _inputs(self, video: bytes, frames: int) -> tuple[dict, dict]:
        timings = {}
        start = time.perf_counter()
        decoded = decode_video(video, frames, self.limits)
        timings["decode_ms"] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        pixels = self.processor(videos=[decoded.frames], return_tensors="pt")["pixel_values_videos"]
        timings["preprocess_ms"] = (time.perf_counter() - start) * 1e3
        ids = self.prompt_ids()
        at = ids.index(self.video_id)
        ids = ids[:at] + [self.video_id] * (frames * TOKENS_PER_FRAME + 1) + ids[at + 1:]
        inputs = {"input_ids": torch.tensor([ids], device=self.device),
                  "pixel_values_videos": pixels.to(self.device, self.model.dtype)}
        return inputs, timings

    def prompt_ids(self) -> list[int]:
        """The chat's token ids, with one video token where the video's tokens go."""
        chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
        return self.tokenizer(self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))[
            "input_ids"]

    def frames_that_fit(self, context_tokens: int, max_tokens: int) -> int:
        """The most frames whose full tokens (T*196 + 1), with the prompt's other tokens and max_tokens
        generated, fit in a context of context_tokens."""
        text = len(self.prompt_ids()) - 1
        return max(0, (context_tokens - max_tokens - text - 1) // TOKENS_PER_FRAME)

    @torch.inference_mode()
    def measure(self, video: bytes, frames: int, max_tokens: int, repeats: int) -> dict:
        runs = []
        for _ in range(repeats + 1):  # the first run warms up kernels and is dropped
            start = time.perf_counter()
            inputs, timings = self._inputs(video, frames)
            _sync(self.device)
            mark = time.perf_counter()
            self.model.model.get_video_features(inputs["pixel_values_videos"],
                                                vision_feature_layer=self.model.config.vision_feature_layer,
                                                vision_feature_select_strategy="full")
            _sync(self.device)
            timings["vision_ms"] = (time.perf_counter() - mark) * 1e3
            mark = time.perf_counter()
            self.model.generate(**inputs, max_new_tokens=1, do_sample=False)
            _sync(self.device)
            generate_one = (time.perf_counter() - mark) * 1e3
            # TTFT: decode + preprocess + generate's first token (vision + prefill), as a client would see it
            timings["ttft_ms"] = timings["decode_ms"] + timings["preprocess_ms"] + generate_one
            timings["prefill_ms"] = generate_one - timings["vision_ms"]
            mark = time.perf_counter()
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            _sync(self.device)
            generated = out.shape[1] - inputs["input_ids"].shape[1]
            timings["decode_ms_per_token"] = ((time.perf_counter() - mark) * 1e3 - generate_one) / max(1, generated - 1)
            timings["service_ms"] = timings["ttft_ms"] + timings["decode_ms_per_token"] * (max_tokens - 1)
            timings["total_ms"] = (time.perf_counter() - start) * 1e3
            runs.append(timings)
        runs = runs[1:]
        result = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        result["visual_tokens"] = frames * TOKENS_PER_FRAME + 1
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        return result

    @torch.inference_mode()
    def generate(self, video: bytes, frames: int, max_tokens: int, streamer=None) -> int:
        """One request as a plain transformers server runs it: decode, preprocess, `generate` (greedy,
        up to max_tokens, stopping at EOS as the LLM service does); each new token goes to
        `streamer` (a transformers BaseStreamer, which first receives the prompt). Returns the
        number of tokens generated."""
        inputs, _ = self._inputs(video, frames)
        out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, streamer=streamer)
        return out.shape[1] - inputs["input_ids"].shape[1]

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


MODELED_FORMULA = ("modeled, not measured under load: req/s = 1000 / service_ms of one measured request, "
                   "service_ms = TTFT + decode ms per token x (max_tokens - 1); TTFT of the k-th client in line "
                   "= k x service_ms + TTFT, k = 0..clients-1 (p50/p99 over those clients)")


def queueing(service_ms: float, ttft_ms: float, clients: int) -> dict:
    """A one-at-a-time server under `clients` closed-loop clients, modeled from one measured request:
    the k-th in line waits k services. Not a measurement: see MODELED_FORMULA."""
    waits = [k * service_ms + ttft_ms for k in range(clients)]
    ordered = sorted(waits)
    return {
        "kind": "modeled",
        "formula": MODELED_FORMULA,
        "service_ms": service_ms,
        "ttft_ms": ttft_ms,
        "clients": clients,
        "rps": 1000.0 / service_ms,
        "ttft_p50_ms": ordered[len(ordered) // 2],
        "ttft_p99_ms": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "note": "one request at a time; queueing computed from the measured service time",
    }
