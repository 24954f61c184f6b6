"""HiAP inside your own training loop: prepare -> your optimizer and loss + prepared.hiap_loss()
-> finalize. Everything hiap_fx.prune does for you, spelled out.

    python examples/own_training_loop.py                      # the demo's dense ViT (cached / trained)
    python examples/own_training_loop.py --from-scratch --steps 40 --limit 2048   # a quick look
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import hiap_fx
from hiap_fx.app.data import fashion_mnist
from hiap_fx.app.demo import demo_model, dense_fashion_mnist_vit
from hiap_fx.training.classify import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--limit", type=int, help="use only this many training/test images")
    ap.add_argument("--from-scratch", action="store_true", help="random weights instead of the dense demo model")
    args = ap.parse_args()
    torch.manual_seed(0)

    train, test = fashion_mnist(True), fashion_mnist(False)
    if args.limit:
        train, test = Subset(train, range(args.limit)), Subset(test, range(min(args.limit, len(test))))
    loader = DataLoader(train, batch_size=128, shuffle=True, drop_last=True)
    test_loader = DataLoader(test, batch_size=500)
    dense = demo_model().eval() if args.from_scratch else dense_fashion_mnist_vit()[0]

    # 1. prepare: capture, find heads/FFNs, insert gates, derive the MAC formula
    config = hiap_fx.PruneConfig(target_macs=args.target)
    prepared = hiap_fx.prepare(dense, torch.randn(2, 1, 28, 28), config)

    # 2. your optimizer: gate logits get their own (larger) learning rate and no weight decay
    gates = [g.logits for g in prepared.gate_modules().values()]
    gate_ids = {id(p) for p in gates}
    weights = [p for p in prepared.parameters() if id(p) not in gate_ids]
    opt = torch.optim.AdamW([{"params": weights, "lr": 5e-4, "weight_decay": 0.05},
                             {"params": gates, "lr": 10 * config.gate_init / args.steps, "weight_decay": 0.0}])

    # 3. your loop: the task loss plus prepared.hiap_loss() (budget controller + feasibility);
    #    prepared.schedule() anneals the Gumbel-Sigmoid temperature and ramps the MAC budget
    prepared.train()
    step = 0
    while step < args.steps:
        for x, y in loader:
            prepared.schedule(step, args.steps)
            loss = F.cross_entropy(prepared(x), y) + prepared.hiap_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0 or step == args.steps:
                print(f"step {step}: loss {loss.item():.3f}, expected MACs "
                      f"{100 * float(prepared.expected_macs().detach()) / prepared.dense_macs:.1f}%, kept "
                      f"{100 * prepared.hard_macs() / prepared.dense_macs:.1f}%")
            if step == args.steps:
                break

    # 4. land exactly on the budget (a common logit offset, only if the kept MACs missed it by
    #    more than budget_tolerance), then finalize: physically remove what the gates closed;
    #    the result is verified against the gated model
    prepared.eval()
    print(f"end-of-run logit offset: {prepared.land_on_budget():+.3f}")
    compact = hiap_fx.finalize(prepared)
    x1 = torch.randn(1, 1, 28, 28)
    print(f"dense   : {hiap_fx.count_macs(dense, x1):,} MACs, accuracy {100 * evaluate(dense, test_loader):.2f}%")
    print(f"compact : {hiap_fx.count_macs(compact, x1):,} MACs, accuracy {100 * evaluate(compact, test_loader):.2f}%")


if __name__ == "__main__":
    main()
