"""Grouped-query and multi-query attention: finalize keeps query heads of one kv group consistent,
computes each live kv head's k/v rows once, and is exact in output and MACs."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_outputs, kernel_calls, site_removed
from gqa_models import GQANet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from independent_macs import independent_macs, randomise_gates

import hiap_fx

REPEATS = ["interleave", "expand", "sdpa"]


def _prepared(repeat: str, heads: int, kv_heads: int, head_dim: int = 8, manual: bool = False,
              qk_dims: bool = True):
    torch.manual_seed(0)
    model = GQANet(heads=heads, kv_heads=kv_heads, head_dim=head_dim, repeat=repeat, manual=manual).eval()
    x = torch.randn(2, 7, 5)
    return model, x, hiap_fx.prepare(model, x, hiap_fx.PruneConfig(qk_dims=qk_dims)).eval()


def _set(gate, off: list[int]) -> None:
    with torch.no_grad():
        gate.logits.fill_(3.0)
        gate.logits[off] = -3.0


def _qkv_rows(compact: torch.nn.Module) -> int:
    """Output rows of the compact q, k and v weights together (finalize fuses them into one)."""
    return sum(p.shape[0] for n, p in compact.named_parameters()
               if n.startswith("attn.") and n.endswith("weight") and not n.startswith("attn.o"))


KERNELS = [(r, False) for r in REPEATS] + [(r, True) for r in REPEATS if r != "sdpa"]  # enable_gqa is sdpa's


@pytest.mark.parametrize("repeat,manual", KERNELS)
def test_gqa_group_widths_and_shared_kv_rows(repeat, manual):
    model, x, prepared = _prepared(repeat, heads=6, kv_heads=2, manual=manual)
    site = prepared.plan.attention[0]
    assert (site.num_heads, site.num_kv_heads, site.kv_of_head) == (6, 2, [0, 0, 0, 1, 1, 1])
    gates = prepared.gate_modules()
    _set(gates["attn.head"], [1, 3])  # one query head of each group
    _set(gates["attn.head_dim"], [0, 1, 2, 8 + 7])  # kv 0 keeps 5 value dims, kv 1 keeps 7
    _set(gates["attn.qk_dim"], [8 + 0, 8 + 1])  # kv 1 keeps 6 q/k dims
    compact = hiap_fx.finalize(prepared)
    assert hiap_fx.count_macs(compact, x) == prepared.hard_macs() == independent_macs(prepared)
    # each live kv head's k and v rows exist once, however many query heads read them; every
    # live head is padded to the widest kept width (8 q/k dims, 7 value dims): one kernel call
    q_rows, k_rows, v_rows = 4 * 8, 2 * 8, 2 * 7
    assert _qkv_rows(compact) == q_rows + k_rows + v_rows
    assert compact.get_parameter("attn.o.weight").shape == (32, 4 * 7)
    with torch.no_grad():
        assert_close_outputs(prepared(x), compact(x), rel=1e-4)


@pytest.mark.parametrize("repeat", REPEATS)
def test_gqa_closing_a_whole_group_drops_its_kv_rows(repeat):
    model, x, prepared = _prepared(repeat, heads=4, kv_heads=2)
    _set(prepared.gate_modules()["attn.head"], [2, 3])  # both query heads of kv head 1
    compact = hiap_fx.finalize(prepared)
    assert _qkv_rows(compact) == 2 * 8 + 8 + 8  # q rows of heads 0, 1; k and v of kv head 0
    assert hiap_fx.count_macs(compact, x) == prepared.hard_macs()


@pytest.mark.parametrize("repeat", REPEATS)
def test_multi_query_attention(repeat):
    """One kv head shared by every query head (MQA): its rows survive while any query head lives."""
    model, x, prepared = _prepared(repeat, heads=4, kv_heads=1)
    site = prepared.plan.attention[0]
    assert site.num_kv_heads == 1 and site.kv_of_head == [0, 0, 0, 0]
    gates = prepared.gate_modules()
    _set(gates["attn.head"], [0, 2])
    _set(gates["attn.head_dim"], [5])
    compact = hiap_fx.finalize(prepared)
    assert _qkv_rows(compact) == 2 * 8 + 8 + 7
    assert hiap_fx.count_macs(compact, x) == prepared.hard_macs() == independent_macs(prepared)
    _set(gates["attn.head"], [0, 1, 2, 3])  # every head closed: the sub-layer leaves the stream
    compact = hiap_fx.finalize(prepared)
    assert _qkv_rows(compact) == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(repeat=st.sampled_from([*REPEATS, "interleave_rope"]), kv_heads=st.integers(1, 3), group=st.integers(1, 3),
       head_dim=st.integers(1, 5), manual=st.booleans(), qk_dims=st.booleans(),
       seed=st.integers(0, 10_000), p_off=st.floats(0.0, 1.0))
def test_gqa_random_decisions(repeat, kv_heads, group, head_dim, manual, qk_dims, seed, p_off):
    manual = manual and repeat != "sdpa"
    model, x, prepared = _prepared(repeat, kv_heads * group, kv_heads, head_dim, manual, qk_dims)
    randomise_gates(prepared, seed, p_off)
    compact = hiap_fx.finalize(prepared)  # verifies output and MACs on x
    assert hiap_fx.count_macs(compact, x) == prepared.hard_macs() == independent_macs(prepared)
    # one kernel call for the attention whatever widths its heads kept (none once it is removed)
    live = [s for s in prepared.plan.attention if not site_removed(prepared, s)]
    assert kernel_calls(compact) == len(live)
    x3 = torch.randn(3, 9, 5)
    with torch.no_grad():
        assert_close_outputs(prepared(x3), compact(x3), rel=1e-4)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_keys_rotated_per_kv_head_before_the_repeat(frontend):
    """Sapiens2's (and LLM-style) grouped-query spelling: q and k normalised and rotated per kv
    head, then ``repeat_interleave``: k and v are rebuilt for the live kv heads, normalised and
    rotated there, and the repeat becomes a selection of each live query head's kv head."""
    torch.manual_seed(0)
    model = GQANet(heads=6, kv_heads=2, head_dim=8, repeat="interleave_rope").eval()
    x = torch.randn(2, 7, 5)
    prepared = hiap_fx.prepare(model, x, hiap_fx.PruneConfig(target_macs=None, frontend=frontend)).eval()
    site = prepared.plan.attention[0]
    assert site.num_kv_heads == 2 and site.q.dims_mixed  # rotary: whole q/k dims stay
    _set(prepared.gate_modules()["attn.head"], [0, 1, 2, 4])  # kv 0 closed, query heads 3 and 5 of kv 1
    compact = hiap_fx.finalize(prepared)
    rows = sum(p.shape[0] for n, p in compact.named_parameters()
               if n.startswith("attn.") and p.dim() == 2 and not n.startswith("attn.o"))
    assert rows == 2 * 8 + 8 + 8  # q for 2 heads, k and v once for the one live kv head
    assert "repeat_interleave" not in compact.code and "index_select" in compact.code
    x3 = torch.randn(3, 7 if frontend == "export" else 9, 5)  # export fixes the token count
    with torch.no_grad():
        assert_close_outputs(prepared(x3), compact(x3), rel=1e-4)
    assert hiap_fx.count_macs(compact, x) == prepared.hard_macs()
