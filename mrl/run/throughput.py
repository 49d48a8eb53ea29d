"""Samples per second of a training run, written into results.json (benchmarks/train_throughput.py reads it).

The steps that met a batch shape for the first time are timed apart: there a compiled forward compiles, and
any run's first step sets up kernels and memory. The rate of the other steps compares compiled and eager runs.
The wall-clock time at the end of the first batch (`first_batch_at`, Unix seconds) dates the end of start-up
(benchmarks/data_scale.py), and the rate after it is the steady one.
"""

import time

import torch


class Throughput:
    def __init__(self):
        self.start, self.samples = time.perf_counter(), 0
        self.shapes, self.new_shape_samples, self.new_shape_seconds = set(), 0, 0.0
        self.first_batch_at, self.first_batch = None, (0, 0.0)  # (its samples, seconds since the start)

    def add(self, shape: tuple, samples: int, seconds: float) -> None:
        """One batch of `samples` samples (over all processes) and input shape `shape` took `seconds`."""
        if self.first_batch_at is None:
            self.first_batch_at, self.first_batch = time.time(), (samples, time.perf_counter() - self.start)
        self.samples += samples
        if shape not in self.shapes:
            self.shapes.add(shape)
            self.new_shape_samples += samples
            self.new_shape_seconds += seconds

    def summary(self) -> dict:
        seconds = time.perf_counter() - self.start
        other_samples, other_seconds = self.samples - self.new_shape_samples, seconds - self.new_shape_seconds
        return {"samples": self.samples, "seconds": round(seconds, 1),
                "samples_per_second": round(self.samples / max(seconds, 1e-9), 1),
                "new_shape_steps": {"count": len(self.shapes), "seconds": round(self.new_shape_seconds, 1)},
                "samples_per_second_other_steps": round(other_samples / max(other_seconds, 1e-9), 1)
                if other_samples else None,
                "first_batch_at": self.first_batch_at,
                "samples_per_second_after_first": round((self.samples - self.first_batch[0]) / max(
                    seconds - self.first_batch[1], 1e-9), 1) if self.samples > self.first_batch[0] else None,
                "peak_cuda_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20)
                if torch.cuda.is_available() else None}
