"""Forward+backward time of every loss vs BCE, eager and torch.compile'd, in one run.

    python bench/losses.py [--device cuda] [--no-compile] [--repeats 200] [--threads 1]

Prints a table of median microseconds per forward+backward and the ratio to ``bce`` measured
in the same run (ratios are what to compare across machines; absolute numbers are noisy on
shared CPUs). Goal: RAL eager <= 2x BCE.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from components.losses import build_loss, loss_names  # noqa: E402

SHAPES = [(256, 26), (1024, 45)]


def loss_kwargs(name: str, c: int) -> dict:
    counts = [max(1.0, 5000.0 / (i + 1) ** 1.5) for i in range(c)]
    return {"cb": {"class_counts": counts}, "db": {"class_counts": counts, "num_samples": 10000}}.get(name, {})


def time_interleaved(fns: dict, x, y, repeats: int, warmup: int, device: str) -> dict:
    """Median microseconds per forward+backward of each fn. The fns take turns, one step each
    per round in a rotating order, so drift on a shared machine hits every loss alike."""

    def step(fn):
        xr = x.detach().requires_grad_()
        fn(xr, y).backward()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for fn in fns.values():
        for _ in range(warmup):
            step(fn)
    names = list(fns)
    samples: dict = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            step(fns[name])
            sync()
            samples[name].append(time.perf_counter() - t0)
    return {n: statistics.median(v) * 1e6 for n, v in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--losses", default=",".join(loss_names()))
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.losses.split(",") if n]
    if "bce" not in names:
        names.insert(0, "bce")
    torch.manual_seed(0)
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"repeats={args.repeats} (median us per forward+backward; ratio = loss / bce, same run)"
    )
    for n, c in SHAPES:
        x = torch.randn(n, c, device=args.device) * 3
        y = (torch.rand(n, c, device=args.device) < 0.1).float()
        eager = {name: build_loss(name, **loss_kwargs(name, c)).to(args.device) for name in names}
        compiled = {}
        if not args.no_compile:
            for name, loss in eager.items():
                try:  # compile here so a missing compiler toolchain shows up before timing
                    fn = torch.compile(loss)
                    fn(x.detach().requires_grad_(), y).backward()
                    compiled[name] = fn
                except Exception as exc:  # ... and does not hide the eager numbers
                    print(f"  torch.compile failed for {name}: {type(exc).__name__}: {exc}".splitlines()[0])
        t_eager = time_interleaved(eager, x, y, args.repeats, args.warmup, args.device)
        print(f"  measured eager at N={n} C={c}", file=sys.stderr, flush=True)
        t_comp = time_interleaved(compiled, x, y, args.repeats, args.warmup, args.device) if compiled else {}
        print(f"  measured compiled at N={n} C={c}", file=sys.stderr, flush=True)
        rows = {name: (t_eager[name], t_comp.get(name, float("nan"))) for name in names}
        be, bc = rows["bce"]
        print(f"\nN={n}, C={c}")
        print("| loss | eager us | eager / bce | compiled us | compiled / bce |")
        print("|---|---:|---:|---:|---:|")
        for name, (e, cpl) in rows.items():
            print(f"| {name} | {e:.0f} | {e / be:.2f} | {cpl:.0f} | {cpl / bc:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
