"""What the PyTorch twins share: the sinusoidal noise embedding, one Heun step, the
timing loop and frozen copies of modules."""
import copy
import statistics
import time

import torch
from torch import nn


class Sinusoidal(nn.Module):
    """[cos(f_k c), sin(f_k c)], frequencies geometric from 1 to max_freq
    (crates/nets/src/embedding.rs)."""

    def __init__(self, dim, max_freq):
        super().__init__()
        half = dim // 2
        self.register_buffer(
            "freqs", torch.tensor([max_freq ** (k / (half - 1)) for k in range(half)])
        )

    def forward(self, c):
        arg = c[..., None] * self.freqs
        return torch.cat([arg.cos(), arg.sin()], -1)


def heun_step(denoise, x, s0, s1, *cond):
    """One step of EDM's Heun sampler from σ = s0 to s1 (two evaluations);
    `denoise(x, σ, *cond)`."""
    n = x.shape[0]
    d = (x - denoise(x, torch.full((n,), s0), *cond)) / s0
    x1 = x + (s1 - s0) * d
    d1 = (x1 - denoise(x1, torch.full((n,), s1), *cond)) / s1
    return x + (s1 - s0) * 0.5 * (d + d1)


def median_ms(reps, f, warmup=3):
    for _ in range(warmup):
        f()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def frozen(module):
    """A copy whose parameters take no gradient (as scoreguide's frozen weights)."""
    m = copy.deepcopy(module)
    for p in m.parameters():
        p.requires_grad_(False)
    return m
