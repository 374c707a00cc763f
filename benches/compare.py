"""scoreguide beside PyTorch on the CPU, in one run: alternates the Rust benchmark
workers (examples/bench, bench_traffic, bench_images) with their PyTorch twins
(benches/torch/*.py) for every thread count, several rounds, and prints the median of
each operation with the ratio scoreguide / PyTorch (below 1: scoreguide is faster),
the ratio of two threads to one, and guided / base step ratios.

Needs PyTorch in a throwaway virtual environment (never a dependency of the project):

    python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch
    cargo build --release --example bench --example bench_traffic --example bench_images
    /tmp/torch/bin/python benches/compare.py --json out/compare.json

Standard library only besides the twins' own torch import.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NETWORKS = {
    "checkerboard": {
        "rust": ["target/release/examples/bench"],
        "torch": ["benches/torch/checkerboard.py"],
        "ops": ["train_step_ms", "forward_grad_x_ms", "score_grad_x_ms", "sample_step_ms",
                "guided_step_ms", "guided2_step_ms"],
    },
    "traffic": {
        "rust": ["target/release/examples/bench_traffic", "--no-distill"],
        "torch": ["benches/torch/traffic.py"],
        "ops": ["train_step_ms", "sample_step_ms", "guided_step_ms"],
    },
    "images": {
        "rust": ["target/release/examples/bench_images"],
        "torch": ["benches/torch/unet.py"],
        "ops": ["grey_train_step_ms", "grey_sample_step_ms", "resnet_grad_x_ms",
                "colour_train_step_ms", "colour_sample_step_ms"],
    },
    "inception": {
        "rust": ["target/release/examples/bench_images", "--inception"],
        "torch": ["benches/torch/inception.py"],
        "ops": ["inception_ms_per_image"],
    },
}


def run_json(cmd, env):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", default="checkerboard,traffic",
                    help="any of checkerboard, traffic, images, inception")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    networks = a.networks.split(",")
    for n in networks:
        exe = ROOT / NETWORKS[n]["rust"][0]
        if not exe.exists():
            sys.exit(f"{exe} is missing: cargo build --release --example {exe.name}")
    samples = {}  # (network, impl, threads, op) -> [ms per round]
    for r in range(a.rounds):
        for n in networks:
            spec = NETWORKS[n]
            for t in threads:
                env = dict(os.environ, RAYON_NUM_THREADS=str(t), OMP_NUM_THREADS=str(t))
                rust = [str(ROOT / spec["rust"][0]), *spec["rust"][1:],
                        "--worker", str(t), "--reps", str(a.reps)]
                torch = [sys.executable, *spec["torch"], "--threads", str(t),
                         "--reps", str(a.reps)]
                # Alternate which goes first, so drift in the machine's speed does not
                # favour one side.
                order = [("scoreguide", rust), ("pytorch", torch)]
                if r % 2:
                    order.reverse()
                for name, cmd in order:
                    res = run_json(cmd, env)
                    for op in spec["ops"]:
                        samples.setdefault((n, name, t, op), []).append(res[op])
                print(f"round {r + 1}/{a.rounds}: {n}, {t} thread(s) done", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = []
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; medians of {a.rounds} rounds")
    for n in networks:
        print(f"\n{n}\n")
        print("| operation | threads | PyTorch (ms) | scoreguide (ms) | scoreguide / PyTorch |")
        print("|---|---|---|---|---|")
        for op in NETWORKS[n]["ops"]:
            for t in threads:
                p, s = med[(n, "pytorch", t, op)], med[(n, "scoreguide", t, op)]
                rows.append({"network": n, "op": op, "threads": t, "pytorch_ms": p,
                             "scoreguide_ms": s, "ratio": s / p})
                print(f"| {op} | {t} | {p:.2f} | {s:.2f} | {s / p:.2f} |")
        if len(threads) > 1:
            print("\n| operation | " + " | ".join(
                f"scoreguide {t} / {threads[0]} threads" for t in threads[1:]) + " |")
            print("|---|" + "---|" * (len(threads) - 1))
            for op in NETWORKS[n]["ops"]:
                base = med[(n, "scoreguide", threads[0], op)]
                print(f"| {op} | " + " | ".join(
                    f"{med[(n, 'scoreguide', t, op)] / base:.2f}" for t in threads[1:]) + " |")
        guided = [op for op in NETWORKS[n]["ops"] if op.startswith("guided")]
        if guided:
            print("\n| threads | " + " | ".join(f"{g} / base, PyTorch | scoreguide" for g in guided) + " |")
            print("|---|" + "---|---|" * len(guided))
            for t in threads:
                cells = []
                for g in guided:
                    for impl in ("pytorch", "scoreguide"):
                        cells.append(f"{med[(n, impl, t, g)] / med[(n, impl, t, 'sample_step_ms')]:.2f}")
                print(f"| {t} | " + " | ".join(cells) + " |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "cpu": cpu_model(), "cores": os.cpu_count(), "rounds": a.rounds,
            "reps": a.reps, "rows": rows,
            "samples": [{"network": k[0], "impl": k[1], "threads": k[2], "op": k[3],
                         "ms": v} for k, v in samples.items()],
        }, indent=2))
        tmp.replace(a.json)


if __name__ == "__main__":
    main()
