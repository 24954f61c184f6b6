"""Gates and the symbolic cost model on a timm DeiT (random weights; runs in seconds on CPU).

    python examples/gates_and_cost.py
"""

from __future__ import annotations

import timm
import torch

import hiap_fx


def main() -> None:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=96, depth=4).eval()
    x = torch.randn(2, 3, 96, 96)
    prepared = hiap_fx.prepare(model, x, hiap_fx.PruneConfig(target_macs=0.6))
    gates = prepared.gate_modules()
    print(f"{len(gates)} gates:", ", ".join(f"{k} ({g.logits.numel()})" for k, g in list(gates.items())[:4]), "...")
    print(f"dense MACs {prepared.dense_macs:,} (corrected FlopCounterMode: {hiap_fx.count_macs(model, x):,})")

    # pin some decisions by hand: close head 1 of block 0, the FFN of block 3, half the neurons of block 2
    with torch.no_grad():
        gates["blocks.0.attn.head"].logits[1] = -5.0
        gates["blocks.3.mlp.ffn"].logits.fill_(-5.0)
        gates["blocks.2.mlp.neuron"].logits[::2] = -5.0
    prepared.eval()
    print(f"hard MACs of the selected sub-network: {prepared.hard_macs():,}")
    print(f"expected MACs (sigmoid probabilities): {float(prepared.expected_macs().detach()):,.0f}")

    cm = prepared.cost_model
    print("FFN of block 2 costs:", cm.by_site()["blocks.2.mlp"])
    dense = cm.dense_values()
    print(f"dense MACs at 224 px (N = 197 tokens), batch 1, from the same expression: "
          f"{cm.evaluate(dense, tokens=197, batch=1):,}")

    prepared.train()
    prepared.set_temperature(2.0)
    loss = prepared.hiap_loss()
    loss.backward()
    print(f"hiap_loss {float(loss.detach()):.4f}; budget multiplier {float(prepared.budget.multiplier):.4f}")


if __name__ == "__main__":
    main()
