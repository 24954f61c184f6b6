"""Gate keys and the meaning of a hard decision: the one place that says what is kept.

A gate is keyed ``"<site>.<kind>"`` (:func:`gate_key`). Eval mode keeps a unit iff its logit is
> 0 and its parent macro gate is kept (``Gate.hard``). Derived from those per-gate vectors, with
one definition used by slicing and the report:

* an attention head is **live** iff its head gate is on and its kv group keeps at least one
  value dim (a head without value dims contributes nothing);
* a site is **removed** iff no head is live (attention) or its block gate is off or it keeps no
  neuron (FFN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiap_fx.gated.gates import GateKind
from hiap_fx.plan import AttentionSite, FFNSite


def gate_key(site: str, kind: str) -> str:
    """The key of a site's gate of one kind (``PreparedModel.gate_modules()`` uses it)."""
    return f"{site}.{kind}"


@dataclass(frozen=True)
class Decisions:
    """Hard decisions (``True`` = kept) by gate key; a missing gate keeps all its units."""

    by_key: dict[str, torch.Tensor]

    def units(self, site: str, kind: GateKind, size: int) -> torch.Tensor:
        """The decision vector of one gate (all kept when the site has no such gate)."""
        return self.by_key.get(gate_key(site, kind), torch.ones(size, dtype=torch.bool)).bool()

    def has(self, site: str, kind: GateKind) -> bool:
        """Whether the site has a gate of this kind."""
        return gate_key(site, kind) in self.by_key

    # --- attention ----------------------------------------------------------------------------

    def heads_on(self, site: AttentionSite) -> torch.Tensor:
        return self.units(site.name, "head", site.num_heads)

    def value_dims(self, site: AttentionSite) -> torch.Tensor:
        """``[kv heads, v dims]``: value dims kept per kv head."""
        return self.units(site.name, "head_dim", site.num_kv_heads * site.v_dim).view(
            site.num_kv_heads, site.v_dim)

    def qk_dims(self, site: AttentionSite) -> torch.Tensor:
        """``[kv heads, q/k dims]``: q/k dims kept per kv head."""
        return self.units(site.name, "qk_dim", site.num_kv_heads * site.head_dim).view(
            site.num_kv_heads, site.head_dim)

    def live_heads(self, site: AttentionSite) -> list[int]:
        """Heads that stay: head gate on and a value dim kept in their kv group."""
        on, dims = self.heads_on(site), self.value_dims(site)
        return [h for h in range(site.num_heads) if bool(on[h]) and bool(dims[site.kv_of_head[h]].any())]

    def attention_untouched(self, site: AttentionSite) -> bool:
        """Every head, value dim and q/k dim kept."""
        return bool(self.heads_on(site).all() and self.value_dims(site).all() and self.qk_dims(site).all())

    # --- FFN ----------------------------------------------------------------------------------

    def ffn_on(self, site: FFNSite) -> bool:
        return bool(self.units(site.name, "ffn", 1).all())

    def neurons(self, site: FFNSite) -> torch.Tensor:
        return self.units(site.name, "neuron", site.hidden)

    def ffn_removed(self, site: FFNSite) -> bool:
        """Block gate off, or no neuron kept."""
        return not self.ffn_on(site) or not bool(self.neurons(site).any())
