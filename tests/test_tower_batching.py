"""Frames of concurrent requests batched through the vision tower: the same tokens as alone,
batches formed from what waits, failures kept to their own request (real engine, real gRPC)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from conftest import running_encoder
from encoder_service.engine import EncoderEngine
from encoder_service.tower_batcher import TowerBatcher, TowerJob
from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc
from videollm import transport
from videollm.settings import CompressionSettings, EncoderSettings
from videos import make_video, moving_frames, scene_cut_frames


def to_pixels(engine, frames: np.ndarray) -> torch.Tensor:
    return engine.processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]  # [T, 3, 384, 384]


def clip_frames(count: int, cut_at: int) -> np.ndarray:
    frames = moving_frames(count)
    frames[cut_at:] = scene_cut_frames(1, count - cut_at)
    return frames


def same_output(batched, alone) -> None:
    assert torch.equal(batched.tokens, alone.tokens)
    assert batched.trace == alone.trace


def test_a_batch_gives_each_request_the_tokens_it_gets_alone(encoder_service):
    vision = encoder_service.engine.vision
    # different frame counts, content and EarlyTom settings, one layer schedule
    requests = [
        (to_pixels(encoder_service.engine, clip_frames(12, 7)), CompressionSettings(retain_ratio=0.1)),
        (to_pixels(encoder_service.engine, clip_frames(5, 2)), CompressionSettings(retain_ratio=0.3, tau=0.8)),
        (to_pixels(encoder_service.engine, moving_frames(9)), CompressionSettings(max_window=2, d=0.0)),
    ]
    batched = vision.encode_batch(requests)
    assert len(batched) == 3
    for output, (pixels, settings) in zip(batched, requests):
        same_output(output, vision.encode(pixels, settings))
    # merging differed per request: each request's own frames decided
    assert len({tuple(o.trace.layer_frames) for o in batched}) == 3


def test_a_batch_without_compression_equals_each_alone(encoder_service):
    vision = encoder_service.engine.vision
    none = CompressionSettings(method="none")
    requests = [(to_pixels(encoder_service.engine, moving_frames(n)), none) for n in (3, 6)]
    for output, (pixels, settings) in zip(vision.encode_batch(requests), requests):
        same_output(output, vision.encode(pixels, settings))


def test_requests_with_other_prune_layers_cannot_share_a_pass(encoder_service):
    vision = encoder_service.engine.vision
    pixels = to_pixels(encoder_service.engine, moving_frames(4))
    with pytest.raises(ValueError, match="schedules differ"):
        vision.encode_batch([(pixels, CompressionSettings()), (pixels, CompressionSettings(prune_layers=[8]))])
    assert vision.schedule(CompressionSettings(retain_ratio=0.5)) == vision.schedule(CompressionSettings(tau=0.2))
    assert vision.schedule(CompressionSettings(method="none")) != vision.schedule(CompressionSettings())


# -- the batcher alone, with a recording batch function ----------------------------------------


class Recorder:
    """A batch function that holds its first batch until `release` is set, and records every batch."""

    def __init__(self, fail_on: int | None = None):
        self.batches: list[list[int]] = []
        self.entered, self.release = threading.Event(), threading.Event()
        self.fail_on = fail_on

    def __call__(self, jobs: list[TowerJob]):
        if not self.batches:
            self.entered.set()
            self.release.wait(10)
        names = [int(job.pixels[0, 0, 0, 0]) for job in jobs]
        self.batches.append(names)
        if self.fail_on in names:
            raise RuntimeError(f"job {self.fail_on} is bad")
        return self._steps(names)

    @staticmethod
    def _steps(names: list[int]):
        yield
        return [name * 10 for name in names]


def job(name: int, frames: int, key: str = "a") -> TowerJob:
    return TowerJob(torch.full((frames, 1, 1, 1), float(name)), CompressionSettings(), key)


def run_all(batcher: TowerBatcher, recorder: Recorder, jobs: list[TowerJob]) -> list:
    """Submit the first job, then the rest while the device is busy with it; results or errors."""
    def one(j):
        try:
            return batcher.run(j).result
        except RuntimeError as err:
            return err

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(one, jobs[0])]
        assert recorder.entered.wait(10), "the worker never took the first job"
        for j in jobs[1:]:  # one by one, so that they wait in this order
            futures.append(pool.submit(one, j))
            deadline = time.monotonic() + 10
            while j not in batcher._waiting:
                assert time.monotonic() < deadline
                time.sleep(0.002)
        recorder.release.set()
        return [f.result() for f in futures]


def test_waiting_requests_of_one_key_share_a_batch_up_to_the_frame_limit():
    recorder = Recorder()
    batcher = TowerBatcher(recorder, max_frames=10, max_requests=8)
    jobs = [job(0, 4), job(1, 4), job(2, 3, key="b"), job(3, 4), job(4, 2), job(5, 3, key="b")]
    results = run_all(batcher, recorder, jobs)
    assert results == [0, 10, 20, 30, 40, 50]
    # job 0 alone (the device was idle); then the waiting ones in passes: the oldest waiting (1) with
    # the jobs of its key that fit beside it in 10 frames (4 + 4 + 2), and b's two together, which
    # run first, having fewer frames
    assert recorder.batches == [[0], [2, 5], [1, 3, 4]]
    assert [j.batch_requests for j in jobs] == [1, 3, 2, 3, 3, 2]
    assert [j.batch_frames for j in jobs] == [4, 10, 6, 10, 10, 6]
    assert batcher.batches_run == 3
    batcher.close()


def test_a_batch_holds_at_most_max_requests():
    recorder = Recorder()
    batcher = TowerBatcher(recorder, max_frames=10, max_requests=2)
    jobs = [job(0, 4), job(1, 4), job(2, 3, key="b"), job(3, 4), job(4, 2), job(5, 3, key="b")]
    assert run_all(batcher, recorder, jobs) == [0, 10, 20, 30, 40, 50]
    assert recorder.batches == [[0], [4], [2, 5], [1, 3]]  # the passes with fewer frames first
    batcher.close()


def test_a_failing_request_fails_alone_and_its_batch_mates_are_served():
    recorder = Recorder(fail_on=2)
    batcher = TowerBatcher(recorder, max_frames=64, max_requests=8)
    results = run_all(batcher, recorder, [job(0, 1), job(1, 1), job(2, 1), job(3, 1)])
    assert results[:2] == [0, 10] and results[3] == 30
    assert isinstance(results[2], RuntimeError) and "job 2 is bad" in str(results[2])
    assert recorder.batches[1] == [1, 2, 3]  # the batch failed, then each ran alone
    assert recorder.batches[2:] == [[1], [2], [3]]
    batcher.close()


def test_a_short_request_waits_for_one_chunk_of_a_long_one_then_runs_to_its_end():
    steps, short_waiting = [], threading.Event()

    def run_batch(jobs):  # a step per frame; the long job's 6th step lasts until the short one waits
        names = tuple(int(j.pixels[0, 0, 0, 0]) for j in jobs)
        for step in range(sum(j.frames for j in jobs)):
            steps.append(names)
            if names == (0,) and step == 5:
                assert short_waiting.wait(10)
            yield
        return [name * 10 for name in names]

    batcher = TowerBatcher(run_batch, max_frames=8, max_requests=2)
    long_job, short_job = job(0, 40), job(1, 3)  # the long one is more than a batch: a pass of its own
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher.run, long_job)
        while len(steps) < 6:
            time.sleep(0.001)
        short = pool.submit(batcher.run, short_job)
        while short_job not in batcher._waiting:
            time.sleep(0.001)
        short_waiting.set()
        assert short.result(timeout=10).result == 10 and first.result(timeout=10).result == 0
    # the chunk in progress ends, the short one runs to its end, then the long one goes on
    assert steps == [(0,)] * 6 + [(1,)] * 3 + [(0,)] * 34
    batcher.close()


def test_a_closed_batcher_refuses_new_requests_with_a_clear_error():
    batcher = TowerBatcher(lambda jobs: iter(()), max_frames=8, max_requests=2)
    batcher.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.run(job(0, 1))


# -- through the real encoder service ------------------------------------------------------------


@pytest.fixture(scope="module")
def batching_encoder(tiny_model_dir):
    with running_encoder(EncoderSettings(model=tiny_model_dir, port=0, max_frames=64, batch_max_requests=4)) as service:
        yield service


VIDEOS = [make_video("mp4", 24 + 8 * i) for i in range(4)]
FRAMES = [4, 6, 3, 5]


def encode_call(stub, i: int):
    responses = list(stub.Encode(transport.encode_inputs(encoder_pb2.EncodeRequest(
        sampling=encoder_pb2.FrameSampling(num_frames=FRAMES[i])), VIDEOS[i])))
    return responses[0].header, b"".join(r.chunk.data for r in responses[1:])


def calls_while_the_device_is_held(service, stub) -> list:
    """Four Encode calls over gRPC: the first holds the device until the other three wait."""
    engine = service.engine
    gate, entered, real = threading.Event(), threading.Event(), engine.batcher.run_batch

    def gated(jobs):
        entered.set()
        gate.wait(10)
        return real(jobs)

    engine.batcher.run_batch = gated
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(encode_call, stub, 0)
            assert entered.wait(20), "the first call never reached the device"
            deadline = time.monotonic() + 20
            rest = [pool.submit(encode_call, stub, i) for i in (1, 2, 3)]
            while len(engine.batcher._waiting) < 3:
                assert time.monotonic() < deadline, "the three calls never waited together"
                time.sleep(0.01)
            gate.set()
            return [first.result()] + [f.result() for f in rest]
    finally:
        engine.batcher.run_batch = real


@pytest.mark.parametrize("batching", [True, False], ids=["batch_max_requests=4", "default"])
def test_concurrent_encode_calls_get_their_own_tokens_batched_or_not(batching, batching_encoder, encoder_service):
    service = batching_encoder if batching else encoder_service
    with grpc.insecure_channel(service.address) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        alone = [encode_call(stub, i) for i in range(4)]
        assert all(header.batch_requests == 1 for header, _ in alone)
        before = stub.Info(encoder_pb2.InfoRequest()).tower_batches
        together = calls_while_the_device_is_held(service, stub)
        info = stub.Info(encoder_pb2.InfoRequest())

    if batching:  # one alone, then the three that waited in one pass
        assert [h.batch_requests for h, _ in together] == [1, 3, 3, 3]
        assert [h.batch_frames for h, _ in together] == [4, 14, 14, 14]
        assert info.tower_batches - before == 2 and info.batch_max_requests == 4
    else:  # the default: one request per pass, whatever waits
        assert [h.batch_requests for h, _ in together] == [1, 1, 1, 1]
        assert [h.batch_frames for h, _ in together] == FRAMES
        assert info.tower_batches - before == 4 and info.batch_max_requests == 1
    assert info.batch_max_frames >= 64
    for (header, payload), (header_alone, payload_alone) in zip(together, alone):
        assert payload == payload_alone
        assert header.compression == header_alone.compression


def test_frames_in_flight_below_max_frames_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="max_frames_in_flight \\(32\\) must be at least max_frames \\(64\\)"):
        EncoderSettings(model=tiny_model_dir, max_frames=64, max_frames_in_flight=32)
    engine = EncoderEngine(EncoderSettings(model=tiny_model_dir, max_frames=64, batch_max_frames=32,
                                           batch_max_requests=2))  # a longer request runs alone
    assert engine.batcher.max_frames == 32 and engine.batcher.max_requests == 2
    engine.close()
