"""The benchmarks' one way of timing a call."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, repeats: int, device: torch.device | None = None) -> float:
    """Median milliseconds of fn() over `repeats` calls, after one warm-up call; on a CUDA device
    each timed call starts and ends with the device synchronized."""
    fn()
    sync = device is not None and device.type == "cuda"
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def wall_and_cpu_ms(fn) -> tuple[float, float]:
    """(wall ms, CPU ms of the whole process) of one call of fn(): CPU above wall means threads."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3
