"""PyTorch twin of `cargo run --release --example bench`: the checkerboard network of
Gen-neG (residual MLP, 297,474 parameters), EDM preconditioning, the DSM step with Adam
and EMA, forward + input gradient, and Heun steps plain and guided by one or two
classifiers of the same architecture. Prints one JSON object with the same keys as the
Rust bench. Run through benches/compare.py, which alternates it with the Rust bench.

    /tmp/torch/bin/python benches/torch/checkerboard.py --threads 1 --reps 30
"""
import argparse
import json
import math

import torch
from torch import nn
import torch.nn.functional as F

from common import Sinusoidal, frozen, heun_step, median_ms


class ResMlp(nn.Module):
    """h = W_in x + W_t emb(c); per block h += W2 SiLU(W1 SiLU(h + W_t emb(c)));
    out = W_out SiLU(h): crates/nets/src/mlp.rs."""

    def __init__(self, in_dim=2, out_dim=2, hidden=256, blocks=2, emb=128):
        super().__init__()
        self.emb = Sinusoidal(emb, 1000.0)
        self.input = nn.Linear(in_dim, hidden)
        self.time = nn.Linear(emb, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)])
            for _ in range(blocks)
        )
        self.output = nn.Linear(hidden, out_dim)

    def forward(self, x, c_noise):
        temb = self.time(self.emb(c_noise))
        h = self.input(x) + temb
        for fc1, fc2 in self.blocks:
            h = h + fc2(F.silu(fc1(F.silu(h + temb))))
        return self.output(F.silu(h))


def edm(sigma, sd=1.0):
    r = torch.sqrt(sigma**2 + sd**2)
    return sd**2 / r**2, sigma * sd / r, 1.0 / r, 0.25 * torch.log(sigma)


class Denoiser(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, sigma):
        c_skip, c_out, c_in, c_noise = edm(sigma)
        return c_skip[:, None] * x + c_out[:, None] * self.net(c_in[:, None] * x, c_noise)


class Classifier(nn.Module):
    """log C = log sigmoid(F(c_in x, ¼ ln σ)): crates/nets/src/classifier.rs."""

    def __init__(self):
        super().__init__()
        self.net = ResMlp(out_dim=1)

    def forward(self, x, sigma):
        _, _, c_in, c_noise = edm(sigma)
        return F.logsigmoid(self.net(c_in[:, None] * x, c_noise)).sum(1)


class Guided:
    """D + σ² Σ ∇x log C: the guided denoiser (crates/guidance)."""

    def __init__(self, base, classifiers):
        self.base, self.classifiers = base, classifiers

    def __call__(self, x, sigma):
        with torch.no_grad():
            d = self.base(x, sigma)
        if not self.classifiers:
            return d
        with torch.enable_grad():
            xv = x.detach().requires_grad_(True)
            total = sum(c(xv, sigma).sum() for c in self.classifiers)
            (g,) = torch.autograd.grad(total, xv)
        return d + (sigma**2)[:, None] * g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    # Training step: DSM with EDM weighting, ln σ uniform on [2e-3, 80], Adam 3e-4,
    # EMA 0.999, batch 1000 (examples/bench's train step).
    model = Denoiser(ResMlp())
    ema = frozen(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    data = torch.randn(1000, 2)
    lo, hi = math.log(2e-3), math.log(80.0)

    def train_step():
        sigma = torch.exp(lo + (hi - lo) * torch.rand(1000))
        z = torch.randn(1000, 2)
        d = model(data + sigma[:, None] * z, sigma)
        w = (sigma**2 + 1.0) / sigma**2
        loss = (w[:, None] * (d - data) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - 0.999)
        return loss.item()

    train_step_ms = median_ms(a.reps, train_step)

    base = frozen(model)
    xb = torch.randn(1000, 2)
    sb = torch.full((1000,), 0.5)

    c0 = frozen(Classifier())

    def forward_grad_x():
        # A classifier's log-probability and its input gradient: what guidance runs.
        xv = xb.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(c0(xv, sb).sum(), xv)
        return g

    def score_grad_x():
        xv = xb.clone().requires_grad_(True)
        score = (base(xv, sb) - xv) / 0.25
        (g,) = torch.autograd.grad(score.sum(), xv)
        return g

    forward_grad_x_ms = median_ms(a.reps, forward_grad_x)
    score_grad_x_ms = median_ms(a.reps, score_grad_x)

    # Heun steps at batch 10k between two noise levels of the paper's 100-step grid.
    x = torch.randn(10_000, 2)
    s0, s1 = 0.5, 0.45
    c1, c2 = frozen(Classifier()), frozen(Classifier())
    reps = min(a.reps, 10)
    sample = median_ms(reps, lambda: heun_step(Guided(base, []), x, s0, s1))
    guided = median_ms(reps, lambda: heun_step(Guided(base, [c1]), x, s0, s1))
    guided2 = median_ms(reps, lambda: heun_step(Guided(base, [c1, c2]), x, s0, s1))
    print(
        json.dumps(
            {
                "threads": a.threads,
                "train_step_ms": train_step_ms,
                "forward_grad_x_ms": forward_grad_x_ms,
                "score_grad_x_ms": score_grad_x_ms,
                "sample_step_ms": sample,
                "guided_step_ms": guided,
                "guided2_step_ms": guided2,
                "params": sum(p.numel() for p in model.parameters()),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
