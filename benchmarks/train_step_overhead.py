"""Cost of one training step of the prepared (gated) model relative to the dense model.

    python benchmarks/train_step_overhead.py [--model deit_small_patch16_224] [--batch 16]

A step is forward, cross-entropy (+ ``hiap_loss()`` for the prepared model: expected MACs,
feasibility, budget controller), backward and an SGD update. Dense and prepared steps are
interleaved and the median is reported, so drift of the machine hits both alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def _step(model, x, y, opt, extra) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out, y)
    if extra:
        loss = loss + model.hiap_loss()
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    import timm

    import hiap_fx

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    dense = timm.create_model(args.model).train()
    size = dense.pretrained_cfg["input_size"]
    prepared = hiap_fx.prepare(dense, torch.randn(2, *size)).train()
    x = torch.randn(args.batch, *size)
    y = torch.randint(0, dense.num_classes, (args.batch,))
    opt_d = torch.optim.SGD(dense.parameters(), lr=1e-6)
    opt_p = torch.optim.SGD(prepared.parameters(), lr=1e-6)
    times_d, times_p = [], []
    for i in range(args.warmup + args.steps):
        td = _step(dense, x, y, opt_d, False)
        tp = _step(prepared, x, y, opt_p, True)
        if i >= args.warmup:
            times_d.append(td)
            times_p.append(tp)
    md, mp = statistics.median(times_d), statistics.median(times_p)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| model | batch | dense step s | prepared step s | ratio |")
    print("|---|---|---|---|---|")
    print(f"| {args.model} | {args.batch} | {md:.3f} | {mp:.3f} | {mp / md:.3f} |")


if __name__ == "__main__":
    main()
