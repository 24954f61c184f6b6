"""Find the attention heads and FFN blocks of any ViT, with no per-model code.

    python examples/inspect_model.py            # a timm DeiT-Tiny
"""

from __future__ import annotations

import torch

import hiap_fx


def main() -> None:
    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    plan = hiap_fx.inspect(model, x)  # prints the table
    site = plan.attention[0]
    print(f"\n{site.name}: q rows of head 1 = {site.q.index[1][:4]}...  "
          f"(fused qkv row = j*H*D + h*D + d)")
    prepared = hiap_fx.prepare(model, x)
    with torch.no_grad():
        err = (prepared(x) - model(x)).abs().max().item()
    print(f"prepared graph reproduces the model: max abs diff {err:.2e}")


if __name__ == "__main__":
    main()
