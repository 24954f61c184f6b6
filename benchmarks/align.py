"""Does rounding kept widths to a multiple pay on this CPU? (the `align` default)

Times the two linears whose width a gate sets in a DeiT-Small block, at every width in a
window around half of the dense width (FFN: 384 -> k -> 384 for k in 736..800; attention output
projection: k = live heads x value width for k in 256..320), at batch 1 and 8 (197 tokens).
For each alignment a in (1, 2, 4, 8, 16, 32, 64) it reports the mean time per kept unit of
widths that are multiples of a against the rest: rounding a width up to a multiple of a adds up
to a-1 units (their MACs, which the cost model counts), so it pays only where aligned widths
are faster per unit by more than that.

    python benchmarks/align.py [--min-time 0.05]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
import torch.nn.functional as F

from hiap_fx.passes.latency.timing import median_seconds


def sweep(rows: int, widths: range, fan: int, min_time: float) -> dict[int, float]:
    """Seconds of x[rows, fan] -> k and x[rows, k] -> fan, summed, for each k."""
    out = {}
    x = torch.randn(rows, fan)
    for k in widths:
        w1, w2 = torch.randn(k, fan), torch.randn(fan, k)
        h = torch.randn(rows, k)
        out[k] = median_seconds(lambda: F.linear(x, w1), min_time) + \
            median_seconds(lambda: F.linear(h, w2), min_time)
    return out


def report(name: str, times: dict[int, float]) -> list[str]:
    lines = []
    per_unit = {k: t / k for k, t in times.items()}
    for a in (1, 2, 4, 8, 16, 32, 64):
        aligned = [per_unit[k] for k in times if k % a == 0]
        rest = [per_unit[k] for k in times if k % a != 0]
        if not aligned:
            continue
        gain = (statistics.mean(rest) / statistics.mean(aligned) - 1) if rest else 0.0
        cost = (a - 1) / 2 / statistics.mean(times.keys())  # mean units rounding up adds, relative
        lines.append(f"| {name} | {a} | {len(aligned)} | {1e9 * statistics.mean(aligned):.2f} | "
                     f"{100 * gain:+.1f}% | {100 * cost:.1f}% | {'yes' if gain > cost else 'no'} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-time", type=float, default=0.05)
    args = ap.parse_args()
    lines = ["| shape | align | widths aligned | ns per unit (aligned) | rest slower by | "
             "rounding adds (mean) | pays |", "|---|---|---|---|---|---|---|"]
    for batch in (1, 8):
        rows = 197 * batch
        lines += report(f"FFN 384-k-384, batch {batch}", sweep(rows, range(736, 801), 384, args.min_time))
        lines += report(f"attn out, 384-k-384, batch {batch}", sweep(rows, range(256, 321), 384, args.min_time))
        print("\n".join(lines[-14:]), flush=True)
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
