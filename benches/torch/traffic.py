"""PyTorch twin of `cargo run --release --example bench_traffic`: the traffic scene
transformer of Gen-neG as `SceneTransformerConfig::traffic` builds it (12 vehicles of 7
features, hidden 64, 4 heads, 2 blocks of RPE self-attention + cross-attention to map
tokens + MLP, a 2-layer patch CNN over 32 x 32 road maps), the VP ε-prediction DSM
step with Adam and EMA at batch 256 (maps encoded in the step), and Heun steps plain
and guided by one per-vehicle classifier of the same architecture. The relative
attention is expanded into batched matmuls exactly as crates/nets/src/layers.rs does
it, so both sides do the same arithmetic; the maps' encoding (tokens and each block's
cross-attention keys and values) is computed once per batch of maps for sampling, as
the Rust network does on frozen weights. Prints one JSON object.

    /tmp/torch/bin/python benches/torch/traffic.py --threads 1 --reps 20
"""
import argparse
import json
import math

import torch
from torch import nn
import torch.nn.functional as F

from common import Sinusoidal, frozen, heun_step, median_ms

A, FEAT, H, HEADS, BLOCKS, CELLS, REL = 12, 7, 64, 4, 2, 32, 32
BETA_MIN, BETA_MAX = 0.1, 20.0


def position_encoding_2d(side, dim):
    q = dim // 4
    pe = torch.zeros(side * side, dim)
    for r in range(side):
        for c in range(side):
            for k in range(q):
                f = 1.0 / 10 ** (k / q)
                pe[r * side + c, [k, q + k, 2 * q + k, 3 * q + k]] = torch.tensor(
                    [math.sin(r * f), math.cos(r * f), math.sin(c * f), math.cos(c * f)]
                )
    return pe


def patches_2x2(x):
    m, r, c, ch = x.shape
    return (
        x.reshape(m, r // 2, 2, c // 2, 2, ch)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(m, r // 2, c // 2, 4 * ch)
    )


class MapEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Linear(4, H // 2)
        self.conv2 = nn.Linear(4 * (H // 2), H)
        self.norm = nn.LayerNorm(H, eps=1e-5)
        self.register_buffer("pos", position_encoding_2d(CELLS // 4, H))

    def forward(self, maps):
        x = maps.permute(0, 2, 3, 1)
        f = F.silu(self.conv1(patches_2x2(x)))
        f = F.silu(self.conv2(patches_2x2(f)))
        return self.norm(f.reshape(maps.shape[0], -1, H) + self.pos)


def split_heads(x):
    b, n, h = x.shape
    return x.reshape(b, n, HEADS, h // HEADS).transpose(1, 2)


def merge_heads(x):
    b, nh, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, nh * dh)


def attention(q, k, v):
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return w @ v


def relative_attention(q, k, v, qr, kr, vr):
    d = q.shape[-1]
    qk = q @ k.transpose(-1, -2)
    q_kr = (q.transpose(1, 2) @ kr.transpose(2, 3)).transpose(1, 2)
    qr_k = (qr.transpose(1, 2) @ k.permute(0, 2, 3, 1)).permute(0, 3, 2, 1)
    qr_kr = (qr * kr).sum(-1).unsqueeze(1)
    w = torch.softmax((qk + q_kr + qr_k + qr_kr) / math.sqrt(d), -1)
    return w @ v + (w.transpose(1, 2) @ vr).transpose(1, 2)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        dh = H // HEADS
        self.n1, self.qkv, self.rel, self.o1 = (
            nn.LayerNorm(H),
            nn.Linear(H, 3 * H),
            nn.Linear(REL, 3 * dh),
            nn.Linear(H, H),
        )
        self.n2, self.q, self.kv, self.o2 = (
            nn.LayerNorm(H),
            nn.Linear(H, H),
            nn.Linear(H, 2 * H),
            nn.Linear(H, H),
        )
        self.n3, self.fc1, self.fc2 = nn.LayerNorm(H), nn.Linear(H, 2 * H), nn.Linear(2 * H, H)

    def forward(self, hs, e, kv):
        dh = H // HEADS
        q, k, v = (split_heads(t) for t in self.qkv(self.n1(hs)).split(H, -1))
        rel = self.rel(e)
        qr, kr, vr = rel[..., :dh], rel[..., dh : 2 * dh], rel[..., 2 * dh :]
        sa = attention(q, k, v) + relative_attention(q, k, v, qr, kr, vr)
        hs = hs + self.o1(merge_heads(sa))
        q = split_heads(self.q(self.n2(hs)))
        k, v = (split_heads(t) for t in kv.split(H, -1))
        hs = hs + self.o2(merge_heads(attention(q, k, v)))
        return hs + self.fc2(F.silu(self.fc1(self.n3(hs))))


class SceneTransformer(nn.Module):
    def __init__(self, out_per_agent):
        super().__init__()
        self.out = out_per_agent
        self.temb = Sinusoidal(64, 1000.0)
        self.demb = Sinusoidal(32, 100.0)
        self.encoder1, self.encoder2 = nn.Linear(FEAT, H), nn.Linear(H, H)
        self.time = nn.Linear(64, H)
        self.distance, self.distance_time = nn.Linear(32, REL), nn.Linear(64, REL)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.final_norm = nn.LayerNorm(H)
        self.decoder1, self.decoder2 = nn.Linear(H, H), nn.Linear(H, out_per_agent)
        self.map = MapEncoder()

    def encode(self, maps):
        """Map tokens and each block's cross-attention keys and values of them."""
        tokens = self.map(maps)
        return [blk.kv(tokens) for blk in self.blocks]

    def forward(self, x, c_noise, kvs):
        b = x.shape[0]
        agents = x.reshape(b, A, FEAT)
        temb = self.temb(c_noise * 1e-3)
        hs = self.encoder2(F.silu(self.encoder1(agents))) + self.time(temb)[:, None]
        pos = agents[..., :2]
        dist = ((pos[:, :, None] - pos[:, None]) ** 2).sum(-1).add(1e-4).sqrt()
        e = F.silu(self.distance(self.demb(dist)) + self.distance_time(temb)[:, None, None])
        for blk, kv in zip(self.blocks, kvs):
            hs = blk(hs, e, kv)
        out = self.decoder2(F.silu(self.decoder1(self.final_norm(hs))))
        return out.reshape(b, A * self.out)


def vp_t_of_sigma(sigma):
    # σ² = exp(∫β) − 1, ∫β = β_min t + ½ (β_max − β_min) t²
    integral = torch.log1p(sigma**2)
    a, b = 0.5 * (BETA_MAX - BETA_MIN), BETA_MIN
    return (-b + torch.sqrt(b * b + 4 * a * integral)) / (2 * a)


def vp_alpha(t):
    return torch.exp(-0.5 * (BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t * t))


def tokens_of(net, maps):
    """The maps' encoding (tokens, then each block's keys and values), once per batch of
    maps, as the Rust network memoises it on frozen weights."""
    cached = getattr(net, "_encoded", None)
    if cached is None or cached[0] is not maps:
        with torch.no_grad():
            net._encoded = (maps, net.encode(maps))
    return net._encoded[1]


class Denoiser:
    """ε prediction on the process's own x_t = α x: D = x − σ F(α x, 999 t)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x, sigma, maps):
        t = vp_t_of_sigma(sigma)
        alpha = vp_alpha(t)[:, None]
        return x - sigma[:, None] * self.net(alpha * x, 999 * t, tokens_of(self.net, maps))


class Guided:
    def __init__(self, base, classifiers):
        self.base, self.classifiers = base, classifiers

    def __call__(self, x, sigma, maps):
        with torch.no_grad():
            d = self.base(x, sigma, maps)
        if not self.classifiers:
            return d
        t = vp_t_of_sigma(sigma)
        alpha = vp_alpha(t)[:, None]
        with torch.enable_grad():
            xv = x.detach().requires_grad_(True)
            total = 0
            for c in self.classifiers:
                logits = c(alpha * xv, 999 * t, tokens_of(c, maps))
                total = total + F.logsigmoid(logits).sum()
            (g,) = torch.autograd.grad(total, xv)
        return d + (sigma**2)[:, None] * g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    b = a.batch
    x0 = torch.randn(b, A * FEAT)
    maps = (torch.rand(b, 1, CELLS, CELLS) < 0.3).float()

    net = SceneTransformer(FEAT)
    ema = frozen(net)
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)

    def train_step():
        t = torch.rand(b) * (1 - 1e-3) + 1e-3
        alpha = vp_alpha(t)[:, None]
        z = torch.randn_like(x0)
        xt = alpha * x0 + torch.sqrt(1 - alpha**2) * z
        eps = net(xt, 999 * t, net.encode(maps))
        loss = ((eps - z) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - 0.999)
        return loss.item()

    train_step_ms = median_ms(a.reps, train_step)
    base = Denoiser(frozen(net))
    classifier = frozen(SceneTransformer(1))
    x = torch.randn(b, A * FEAT)
    sample = median_ms(a.reps, lambda: heun_step(Guided(base, []), x, 1.0, 0.9, maps))
    guided = median_ms(
        a.reps, lambda: heun_step(Guided(base, [classifier]), x, 1.0, 0.9, maps)
    )
    print(
        json.dumps(
            {
                "threads": a.threads,
                "batch": b,
                "train_step_ms": train_step_ms,
                "sample_step_ms": sample,
                "guided_step_ms": guided,
                "params": sum(p.numel() for p in net.parameters()),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
