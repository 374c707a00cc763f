"""PyTorch twin of `cargo run --release --example bench_images`: the image U-Net of
crates/nets/src/unet.rs (DDPM++ style: residual blocks with the noise embedding as a
per-image bias of their first convolution, attention at the listed resolutions, stride-2
convolutions down, nearest upsampling + convolution up, skips rescaled by 1/√2, group
norm ε = 1e-6) under EDM preconditioning; the DSM training step with Adam and EMA, and
one Heun step, at batch 64 on 28 × 28 × 1 and 32 × 32 × 3 images. Prints one JSON object
with the Rust bench's keys; and the noise-conditioned ResNet-18 classifier of
crates/nets/src/resnet.rs (pre-activation blocks with group norm and SiLU, the noise
embedding as a per-image bias of each block's first convolution), log p(y | x; σ) and
its input gradient. Run through benches/compare.py --networks images.

    /tmp/torch/bin/python benches/torch/unet.py --threads 1 --reps 10
"""
import argparse
import json
import math

import torch
from torch import nn
import torch.nn.functional as F

from common import Sinusoidal, frozen, heun_step, median_ms

SKIP = 1 / math.sqrt(2)


def groups_for(c, most=32):
    return next(g for g in range(max(1, min(most, c // 4)), 0, -1) if c % g == 0)


def norm(c):
    return nn.GroupNorm(groups_for(c), c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb, dropout):
        super().__init__()
        self.norm1, self.norm2 = norm(cin), norm(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.embedding = nn.Linear(emb, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.embedding(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return ((self.skip(x) if self.skip is not None else x) + h) * SKIP


class Attention(nn.Module):
    def __init__(self, c, heads):
        super().__init__()
        self.norm, self.heads = norm(c), heads
        self.qkv, self.out = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        dh = c // self.heads
        qkv = self.qkv(self.norm(x)).reshape(b, 3 * self.heads, dh, h * w)
        q, k, v = qkv.split(self.heads, dim=1)
        attn = torch.softmax(q.transpose(2, 3) @ k / math.sqrt(dh), -1)
        out = (v @ attn.transpose(2, 3)).reshape(b, c, h, w)
        return (x + self.out(out)) * SKIP


class UNet(nn.Module):
    def __init__(self, channels, size, base, mults, blocks, attn_res, heads=1, dropout=0.1,
                 emb_dim=64):
        super().__init__()
        emb = 4 * base
        self.sinusoidal = Sinusoidal(emb_dim, 1000.0)
        self.embed1, self.embed2 = nn.Linear(emb_dim, emb), nn.Linear(emb, emb)
        self.input = nn.Conv2d(channels, base, 3, padding=1)
        self.down, skips, ch, side = nn.ModuleList(), [base], base, size
        for level, m in enumerate(mults):
            for _ in range(blocks):
                self.down.append(nn.ModuleList([
                    ResBlock(ch, m * base, emb, dropout),
                    Attention(m * base, heads) if side in attn_res else nn.Identity()]))
                ch = m * base
                skips.append(ch)
            if level + 1 < len(mults):
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
                side //= 2
        self.middle = nn.ModuleList([ResBlock(ch, ch, emb, dropout), Attention(ch, heads),
                                     ResBlock(ch, ch, emb, dropout)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mults))):
            for _ in range(blocks + 1):
                self.up.append(nn.ModuleList([
                    ResBlock(ch + skips.pop(), m * base, emb, dropout),
                    Attention(m * base, heads) if side in attn_res else nn.Identity()]))
                ch = m * base
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
                side *= 2
        self.out_norm, self.out = norm(ch), nn.Conv2d(ch, channels, 3, padding=1)

    def forward(self, x, c_noise):
        emb = F.silu(self.embed2(F.silu(self.embed1(self.sinusoidal(c_noise)))))
        h = self.input(x)
        hs = [h]
        for stage in self.down:
            if isinstance(stage, nn.ModuleList):
                h = stage[1](stage[0](h, emb))
            else:
                h = stage(h)
            hs.append(h)
        h = self.middle[2](self.middle[1](self.middle[0](h, emb)), emb)
        for stage in self.up:
            if isinstance(stage, nn.ModuleList):
                h = stage[1](stage[0](torch.cat([h, hs.pop()], 1), emb))
            else:
                h = stage(h)
        return self.out(F.silu(self.out_norm(h)))


def edm(sigma, sd=1.0):
    r = torch.sqrt(sigma**2 + sd**2)
    return sd**2 / r**2, sigma * sd / r, 1.0 / r, 0.25 * torch.log(sigma)


class Denoiser(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, sigma):
        c_skip, c_out, c_in, c_noise = (c[:, None, None, None] if i < 3 else c
                                        for i, c in enumerate(edm(sigma)))
        return c_skip * x + c_out * self.net(c_in * x, c_noise)


class Block(nn.Module):
    def __init__(self, cin, cout, stride, emb):
        super().__init__()
        self.norm1, self.norm2 = norm(cin), norm(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.embedding = nn.Linear(emb, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride)
                         if stride != 1 or cin != cout else None)

    def forward(self, x, emb):
        a = F.silu(self.norm1(x))
        h = self.conv1(a) + self.embedding(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.shortcut(a) if self.shortcut is not None else x) + h


class ResNet(nn.Module):
    """ResNetConfig::resnet18(channels, size, classes, width), noise-conditioned."""

    def __init__(self, channels=1, classes=10, width=32, blocks=(2, 2, 2, 2), emb_dim=64):
        super().__init__()
        emb = 4 * width
        self.sinusoidal = Sinusoidal(emb_dim, 1000.0)
        self.embed1, self.embed2 = nn.Linear(emb_dim, emb), nn.Linear(emb, emb)
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks, ch = nn.ModuleList(), width
        for stage, n in enumerate(blocks):
            for i in range(n):
                cout = width << stage
                self.blocks.append(Block(ch, cout, 2 if stage > 0 and i == 0 else 1, emb))
                ch = cout
        self.out_norm, self.head = norm(ch), nn.Linear(ch, classes)

    def forward(self, x, c_noise):
        emb = F.silu(self.embed2(F.silu(self.embed1(self.sinusoidal(c_noise)))))
        h = self.stem(x)
        for b in self.blocks:
            h = b(h, emb)
        return self.head(F.silu(self.out_norm(h)).mean((2, 3)))


def resnet_grad_x(batch, reps):
    """log p(y | x; σ) (EDM's c_in and ¼ ln σ, as crates/nets/src/classifier.rs) and
    ∇x of it, on frozen weights."""
    net = frozen(ResNet())
    x = torch.randn(batch, 1, 28, 28)
    sigma = torch.full((batch,), 0.5)
    labels = torch.arange(batch) % 10
    _, _, c_in, c_noise = edm(sigma)

    def step():
        xv = x.clone().requires_grad_(True)
        lp = torch.log_softmax(net(c_in[:, None, None, None] * xv, c_noise), 1)
        (g,) = torch.autograd.grad(lp.gather(1, labels[:, None]).sum(), xv)
        return g

    return median_ms(reps, step, warmup=2), sum(p.numel() for p in net.parameters())


# crates/nets/src/unet.rs: UNetConfig::small_grey and small_colour.
CONFIGS = {
    "grey": dict(channels=1, size=28, base=32, mults=(1, 2, 2), blocks=2, attn_res=(7,)),
    "colour": dict(channels=3, size=32, base=64, mults=(1, 2, 2, 2), blocks=2,
                   attn_res=(16, 8)),
}


def measure(cfg, batch, reps):
    model = Denoiser(UNet(**cfg))
    ema = frozen(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    c, s = cfg["channels"], cfg["size"]
    data = torch.tanh(torch.randn(batch, c, s, s))
    lo, hi = math.log(2e-3), math.log(80.0)

    def train_step():
        sigma = torch.exp(lo + (hi - lo) * torch.rand(batch))
        z = torch.randn_like(data)
        d = model(data + sigma[:, None, None, None] * z, sigma)
        w = (sigma**2 + 1.0) / sigma**2
        loss = (w * ((d - data) ** 2).flatten(1).sum(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - 0.999)
        return loss.item()

    train_ms = median_ms(reps, train_step, warmup=2)
    base = frozen(model).eval()
    x = torch.randn(batch, c, s, s)
    with torch.no_grad():
        sample_ms = median_ms(reps, lambda: heun_step(base, x, 0.5, 0.45), warmup=1)
    return train_ms, sample_ms, sum(p.numel() for p in model.parameters())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = {"threads": a.threads, "batch": a.batch, "torch": torch.__version__}
    out["resnet_grad_x_ms"], out["resnet_params"] = resnet_grad_x(a.batch, a.reps)
    for name, cfg in CONFIGS.items():
        t, s, p = measure(cfg, a.batch, a.reps)
        out.update({f"{name}_train_step_ms": t, f"{name}_sample_step_ms": s,
                    f"{name}_params": p})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
