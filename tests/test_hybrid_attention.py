"""Attention spellings of hybrid and edge models (tests/hybrid_zoo.py): every attention becomes a
site, every sub-layer is found on its residual branch, and any random gate decision finalizes
into a compact model equal to the hard-gated one (property test)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_outputs, finalizes_exactly
from hybrid_zoo import CHANNEL_SPELLINGS, FORMS, HybridNet, example
from hypothesis import HealthCheck, given, settings
from hypothesis import example as pinned
from hypothesis import strategies as st
from independent_macs import randomise_gates

import hiap_fx
from hiap_fx.passes.conv_linears import overlap_add
from hiap_fx.passes.subnorms import width_stats


def _prepare(net: HybridNet) -> hiap_fx.PreparedModel:
    return hiap_fx.prepare(net.eval(), example(net, 1), hiap_fx.PruneConfig(target_macs=None))


def _finalizes_exactly(net: HybridNet, prepared: hiap_fx.PreparedModel, seed: int, p_off: float) -> torch.nn.Module:
    """Random decisions (``p_off`` of the units closed) finalize into a compact model equal to
    the hard-gated one on a batch of three, counting the MACs the cost model predicts."""
    return finalizes_exactly(prepared, example(net, 1), example(net, batch=3, seed=seed), seed, p_off)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("spelling", CHANNEL_SPELLINGS)
def test_every_attention_is_a_site_on_its_residual(form, spelling):
    net = HybridNet(form, spelling=spelling)
    prepared = _prepare(net)
    plan = prepared.plan
    assert len(plan.attention) == 2 and len(plan.ffn) == 2, plan.unclaimed
    assert {(s.num_heads, s.head_dim) for s in plan.attention} == {(2, 4)}
    assert all(s.residual is not None for s in plan.ffn)
    # LeViT's projection ends in a batch norm and LowFormer's transposed convolution adds a bias,
    # which do not map a closed branch to zero: their attention is gated (heads, dims) but cannot
    # leave the residual stream as a whole
    # (Hiera's pooled queries: the shortcut is pooled too, so the attention joins no residual)
    assert all((s.residual is None) == (form in ("bn_rows", "upsampled", "q_pooled")) for s in plan.attention)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(form=st.sampled_from(FORMS), spelling=st.sampled_from(CHANNEL_SPELLINGS),
       heads=st.integers(1, 4), head_dim=st.integers(1, 4), p_off=st.sampled_from([0.2, 0.5, 0.8, 1.0]),
       seed=st.integers(0, 10_000))
# head count = head width: a literal 2 in ``o.shape[-1] * 2`` names the heads, not the width
@pinned(form="grid_out", spelling="kernel", heads=2, head_dim=2, p_off=0.2, seed=0)
# a scale on q after its layout ops, read by a relative-position term: q is rebuilt before it
@pinned(form="folded_manual", spelling="shape", heads=1, head_dim=2, p_off=0.2, seed=0)
def test_random_decisions_finalize_exactly(form, spelling, heads, head_dim, p_off, seed):
    torch.manual_seed(seed)
    net = HybridNet(form, heads=heads, head_dim=head_dim, spelling=spelling)
    prepared = _prepare(net)
    assert len(prepared.plan.attention) == 2, prepared.plan.unclaimed
    _finalizes_exactly(net, prepared, seed, p_off)


def test_channel_attention_gates_whole_heads():
    """XCiT's cross-covariance attention: each head's dims are the kernel's tokens, so the site is
    transposed, only whole heads are gated, and the kernel's cost follows the live heads."""
    net = HybridNet("channel", heads=3, head_dim=4)
    prepared = _prepare(net)
    assert all(s.transposed and s.tokens == 4 and s.layout.out_dim_axis == -2 for s in prepared.plan.attention)
    bundles = prepared.site_gates()
    sites = [s.name for s in prepared.plan.attention]
    assert all(set(bundles[name].gates()) == {"head"} for name in sites)
    with torch.no_grad():  # every head open but head 1 of the first attention
        for name in sites:
            bundles[name].gates()["head"].logits.fill_(3.0)
        bundles[sites[0]].gates()["head"].logits[1] = -3.0
    compact = hiap_fx.finalize(prepared.eval())
    x = example(net, batch=3)
    with torch.no_grad():
        assert_close_outputs(prepared(x), compact(x), rel=1e-4)
    dense, kept = prepared.dense_macs, hiap_fx.count_macs(compact, example(net, 1))
    assert kept == prepared.hard_macs() < dense


def test_clipped_projections_keep_their_clamp_and_norms():
    """Gemma4's clamped projections are replayed on the kept rows; the per-head RMS norm over v
    leaves only whole heads to gate there."""
    net = HybridNet("clipped", heads=3, head_dim=4)
    prepared = _prepare(net)
    assert len(prepared.plan.attention) == 2
    assert all(s.v.dims_mixed and not s.transposed for s in prepared.plan.attention)
    randomise_gates(prepared, 3, 0.4)
    compact = hiap_fx.finalize(prepared.eval())
    code = compact.code
    assert code.count("clamp") >= 6  # q, k, v and the output of both blocks
    x = example(net, batch=3)
    with torch.no_grad():
        assert_close_outputs(prepared(x), compact(x), rel=1e-4)


def test_attention_inside_a_closed_ffn_branch_dies_with_it():
    """EdgeNeXt's block: the attention sits inside the FFN's residual branch, so closing the FFN
    block removes the attention as well; the cost model counts that (MACs of the compact model)."""
    net = HybridNet("nested", heads=2, head_dim=4)
    prepared = _prepare(net)
    bundles = prepared.site_gates()
    with torch.no_grad():
        for site in prepared.plan.ffn:
            bundles[site.name].gates()["ffn"].logits.fill_(-3.0)
    compact = hiap_fx.finalize(prepared.eval())  # verifies output and MACs
    assert hiap_fx.count_macs(compact, example(net, 1)) == prepared.hard_macs()
    assert "scaled_dot_product_attention" not in compact.code


@pytest.mark.parametrize("form", ["bn_rows", "conv_bn", "clipped"])
def test_export_spellings_finalize_exactly(form):
    """The same forms captured by torch.export (batch norms become aten calls with their
    statistics as arguments, as in HF LeViT): random decisions still finalize exactly."""
    net = HybridNet(form, heads=3, head_dim=4)
    prepared = hiap_fx.prepare(net.eval(), example(net, 1), hiap_fx.PruneConfig(target_macs=None, frontend="export"))
    assert prepared.plan.frontend == "export" and len(prepared.plan.attention) == 2, prepared.plan.unclaimed
    _finalizes_exactly(net, prepared, 5, 0.4)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("heads", [1, 3])
def test_pooled_heads_with_the_queries_added_to_the_output(frontend, heads):
    """MViTv2: q/k/v pooled per head by a depthwise convolution over the dims (heads folded into
    the batch axis, k and v strided), normalised over the dims, and q added to the kernel output.
    Dims are shared by all heads there: only whole heads are gated; the output gate follows the
    add (a closed head drops its queries too); random decisions finalize exactly, the pooling's
    MACs shrinking with the live heads."""
    net = HybridNet("pooled", heads=heads, head_dim=3)
    prepared = hiap_fx.prepare(net.eval(), example(net, 1), hiap_fx.PruneConfig(target_macs=None, frontend=frontend))
    assert prepared.plan.frontend == frontend and len(prepared.plan.attention) == 2, prepared.plan.unclaimed
    for site in prepared.plan.attention:
        assert site.out_residual and site.q.dims_mixed and site.k.dims_mixed and site.v.dims_mixed
    kinds = {key.rsplit(".", 1)[1] for key in prepared.gate_modules()}
    assert "head" in kinds and not kinds & {"head_dim", "qk_dim"}
    for seed in range(3):
        _finalizes_exactly(net, prepared, seed, 0.5)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("heads", [1, 2])
def test_attention_over_part_of_the_channels(frontend, heads):
    """SHViT: attention over the first channels of the map, its output concatenated with the
    other channels before the output projection, batch norms after the convolutions (so the
    branch never vanishes: no residual to leave). The passed channels keep their projection
    columns; with every value dim closed the projection reads only them; random decisions
    finalize exactly."""
    net = HybridNet("partial_bn", heads=heads, head_dim=3)
    prepared = hiap_fx.prepare(net.eval(), example(net, 1), hiap_fx.PruneConfig(target_macs=None, frontend=frontend))
    sites = prepared.plan.attention
    assert len(sites) == 2, prepared.plan.unclaimed
    assert all(len(s.passthrough) == 1 and s.residual is None and (s.num_heads, s.v_dim) == (heads, 3)
               for s in sites)
    dim, part = heads * 3, max(1, heads * 3 // 2)
    for seed, p_off in ((0, 0.4), (1, 0.7), (2, 1.0)):
        compact = _finalizes_exactly(net, prepared, seed, p_off)
    # every unit closed: each output projection keeps just the columns of the passed channels
    proj_cols = sorted(p.shape[1] for n, p in compact.named_parameters() if p.dim() == 2 and p.shape[0] == dim)
    assert proj_cols[:2] == [dim - part] * 2


@settings(max_examples=30, deadline=None, database=None)
@given(c_in=st.integers(1, 5), c_out=st.integers(1, 4), kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), pad=st.integers(0, 1), extra=st.integers(0, 2),
       side=st.integers(1, 4), seed=st.integers(0, 1000))
# the padding eats the whole map (an empty output)
@pinned(c_in=1, c_out=1, kernel=(2, 2), stride=(1, 1), pad=1, extra=0, side=1, seed=0)
def test_a_transposed_convolution_is_a_linear_and_an_overlap_add(c_in, c_out, kernel, stride, pad, extra, side, seed):
    """The rewrite behind LowFormer's output projection: ``conv_transpose2d`` equals a linear
    from the input channels to (output channel x kernel position) and ``overlap_add``."""
    padding = (min(pad, kernel[0] - 1), min(pad, kernel[1] - 1))
    output_padding = (min(extra, stride[0] - 1), min(extra, stride[1] - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c_in, side, side + 1, generator=gen)
    w, b = torch.randn(c_in, c_out, *kernel, generator=gen), torch.randn(c_out, generator=gen)
    want = torch.nn.functional.conv_transpose2d(x, w, b, stride, padding, output_padding)
    cols = torch.nn.functional.linear(x.movedim(1, -1), w.reshape(c_in, -1).t())
    got = overlap_add(cols, kernel, stride, padding, output_padding) + b.reshape(1, -1, 1, 1)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_attention_with_a_transposed_convolution_as_its_output_projection(frontend):
    """LowFormer: q/k/v of each head from a strided depthwise convolution and a 1x1 convolution,
    the output projection a transposed convolution back to the input resolution (with a bias:
    the branch never vanishes). Its input channels are cut with the heads and dims; with every
    unit closed the projection reads no features and nothing that fed only the attention stays
    (the downsampling convolution goes too: the MACs match the cost model)."""
    net = HybridNet("upsampled", heads=3, head_dim=2)
    prepared = hiap_fx.prepare(net.eval(), example(net, 1), hiap_fx.PruneConfig(target_macs=None, frontend=frontend))
    sites = prepared.plan.attention
    assert prepared.plan.frontend == frontend
    assert len(sites) == 2 and all(s.residual is None for s in sites), prepared.plan.unclaimed
    for seed, p_off in ((0, 0.3), (1, 0.6), (2, 1.0)):
        compact = _finalizes_exactly(net, prepared, seed, p_off)
    # all closed: no depthwise downsampling convolution remains (only the stem convolution)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in compact.modules()) + \
        sum("conv2d" in str(n.target) for n in compact.graph.nodes) == 1


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("form", ["gated", "gated_tokens"])
def test_a_gate_multiplying_the_output_is_cut_with_the_value_dims(form, frontend):
    """IFormer: ``proj(attn_out * gate)`` with v and the gate from one 1x1 convolution + batch
    norm through a sigmoid, chunked (``gated``), or a separate gate linear over tokens
    (``gated_tokens``). The gate's rows are cut with the value dims of the live heads (padded
    like them), random decisions finalize exactly, and the gate projection shrinks."""
    net = HybridNet(form, heads=3, head_dim=2)
    prepared = hiap_fx.prepare(net.eval(), example(net, 1), hiap_fx.PruneConfig(target_macs=None, frontend=frontend))
    sites = prepared.plan.attention
    assert len(sites) == 2 and all(s.out_gate is not None and s.out_gate_mul for s in sites), prepared.plan.unclaimed
    assert all(sorted(r for head in s.out_gate.index for r in head) == list(range(6, 12)) if form == "gated"
               else sorted(r for head in s.out_gate.index for r in head) == list(range(6)) for s in sites)
    for seed, p_off in ((0, 0.3), (1, 0.6), (2, 1.0)):
        compact = _finalizes_exactly(net, prepared, seed, p_off)
    # a decision that keeps one head of two dims: the gate keeps 2 rows (v and gate: 4 together)
    bundles = prepared.site_gates()
    with torch.no_grad():
        for site in sites:
            gates = bundles[site.name].gates()
            gates["head"].logits.copy_(torch.tensor([3.0, -3.0, -3.0]))
            gates["head_dim"].logits.fill_(3.0)
    compact = hiap_fx.finalize(prepared.eval())
    shapes = [tuple(t.shape) for t in compact.state_dict().values()]
    # v and gate rows of one conv; or q, k, v and gate rows (finalize fuses linears that read
    # one input), 2 each: the gate's rows were cut to the live head's dims
    gate_rows = (4, 6) if form == "gated" else (8, 6)
    assert shapes.count(gate_rows) == 2, shapes


@pytest.mark.parametrize("form", ["q_pooled", "upsampled"])
def test_sizes_read_from_the_operands_do_not_keep_them_dense(form):
    """Hiera reads the pooled map's size from q (``H, W = q.shape[1:3]``), LowFormer reads the
    batch and map size from its projection's output (``N, _, h, w = y.size()``), and both use
    them outside the operands (the output reshape). Traced by fx, the readers get the rebuilt
    operand's size or the recorded one (the batch from the input): no dense projection stays
    for them, at any batch."""
    net = HybridNet(form, heads=2, head_dim=3)
    prepared = hiap_fx.prepare(net.eval(), example(net, 1), hiap_fx.PruneConfig(target_macs=None, frontend="fx"))
    assert len(prepared.plan.attention) == 2, prepared.plan.unclaimed
    randomise_gates(prepared, 3, 0.5)
    compact = hiap_fx.finalize(prepared.eval())
    for batch in (1, 4):
        x = example(net, batch=batch, seed=batch)
        with torch.no_grad():
            assert_close_outputs(prepared(x), compact(x), rel=1e-4)
    assert hiap_fx.count_macs(compact, example(net, 1)) == prepared.hard_macs() < prepared.dense_macs
    dense_rows = 3 * 2 * 3  # the qkv projection of two heads of three
    assert all(p.shape[0] != dense_rows for p in compact.parameters() if p.dim() == 2)


@pytest.mark.parametrize("form", ["folded", "folded_manual"])
def test_heads_folded_into_the_batch_axis(form):
    """SAM-ViT / BoTNet: q, k, v as (B * heads, N, d) and a relative-position term computed from
    q. The head masks act per (batch, head) slice, the term is computed again from the rebuilt
    q (only whole heads: it contracts q's dims with shared tables), its MACs follow the live
    heads, and finalize also checks a batch of two."""
    net = HybridNet(form, heads=3, head_dim=4)
    prepared = _prepare(net)
    sites = prepared.plan.attention
    assert len(sites) == 2, prepared.plan.unclaimed
    assert all(s.layout.batch_folded == ["q", "k", "out"] and len(s.logits_terms) == 1 and s.q.dims_mixed
               for s in sites)
    x = example(net, batch=3, seed=1)
    with torch.no_grad():  # every gate open: the gated model is the model, at any batch
        assert_close_outputs(net(x), prepared.eval()(x), rel=1e-5)
    bundles = prepared.site_gates()
    with torch.no_grad():
        for site in sites:
            bundles[site.name].gates()["head"].logits.copy_(torch.tensor([3.0, -3.0, 3.0]))
    compact = hiap_fx.finalize(prepared.eval())
    with torch.no_grad():
        assert_close_outputs(prepared(x), compact(x), rel=1e-4)
    assert hiap_fx.count_macs(compact, example(net, 1)) == prepared.hard_macs() < prepared.dense_macs
    rows = [p.shape[0] for p in compact.parameters() if p.dim() == 2]
    assert rows.count(3 * 2 * 4) == 2 and 3 * 3 * 4 not in rows  # one qkv linear of 2 live heads per block


def test_folded_heads_at_a_larger_example_batch_say_what_to_do():
    net = HybridNet("folded")
    with pytest.warns(hiap_fx.HiapWarning):
        prepared = hiap_fx.prepare(net.eval(), example(net, 2), hiap_fx.PruneConfig(target_macs=None))
    assert not prepared.plan.attention
    assert all("example_inputs[:1]" in u.reason for u in prepared.plan.unclaimed if "attention" in u.what)


def test_folded_mask_matches_a_loop_over_the_batch():
    from hiap_fx.gated.bundles import folded_mask_mul

    x, mask = torch.randn(2 * 3, 5, 4), torch.tensor([1.0, 0.0, 0.5]).reshape(3, 1, 1)
    want = torch.cat([x[3 * b:3 * b + 3] * mask for b in range(2)])
    assert torch.equal(folded_mask_mul(x, mask, -3), want)
    assert torch.equal(folded_mask_mul(x, mask, 0), want)


class _OffStreamSubNorm(torch.nn.Module):
    """A sub-LN attention whose output goes straight to the classifier (no residual branch), so
    a closed attention leaves its output bias: ``W @ b_norm + c``."""

    def __init__(self, rms: bool) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(6, 8)
        self.qkv, self.proj = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)
        self.norm = torch.nn.RMSNorm(8) if rms else torch.nn.LayerNorm(8)
        with torch.no_grad():
            for p in self.norm.parameters():
                p.add_(torch.randn_like(p))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.head(self.proj(self.norm(o)).mean(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("closed", ["some", "all"])
def test_a_norm_over_the_merged_heads_before_the_projection(frontend, rms, closed):
    """BEiT3's / EVA02-CLIP's sub-LN: heads are cut exactly (the statistics keep the nominal
    width), and with every head closed the attention leaves only ``W @ b_norm + c``."""
    torch.manual_seed(3)
    net = _OffStreamSubNorm(rms).eval()
    x = torch.randn(1, 5, 6)
    prepared = hiap_fx.prepare(net, x, hiap_fx.PruneConfig(target_macs=None, frontend=frontend))
    site = prepared.plan.attention[0]
    assert len(prepared.plan.attention) == 1 and site.residual is None, prepared.plan.unclaimed
    bundle = prepared.site_gates()[site.name]
    with torch.no_grad():
        for gate in bundle.gates().values():
            gate.logits.fill_(3.0)
        bundle.gates()["head"].logits[0] = -3.0
        if closed == "all":
            bundle.gates()["head"].logits.fill_(-3.0)
    compact = hiap_fx.finalize(prepared.eval())
    xs = torch.randn(4, 5, 6)
    with torch.no_grad():
        assert_close_outputs(prepared(xs), compact(xs), rel=1e-4)
        if closed == "all":  # the branch is constant: the norm of zeros through the projection
            assert torch.allclose(compact(xs), compact(xs + 1.0), atol=1e-6)
    assert "scaled_dot_product_attention" not in compact.code or closed == "some"


@settings(max_examples=30, deadline=None, database=None)
@given(width=st.integers(1, 12), missing=st.integers(0, 6), centred=st.booleans(), seed=st.integers(0, 1000))
def test_width_statistics_ignore_removed_zero_features(width, missing, centred, seed):
    """Statistics over a nominal width are those of the full row with the removed features as
    zeros, and they reproduce ``layer_norm`` / ``rms_norm`` on the full row."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(3, width + missing, generator=gen)
    full[:, width:] = 0.0
    short = full[:, :width]
    stats_full = width_stats(full, width + missing, 1e-6, centred)
    assert torch.allclose(width_stats(short, width + missing, 1e-6, centred), stats_full, atol=1e-6)
    if centred:
        rebuilt = full * stats_full[:, :1] - stats_full[:, 1:]
        assert torch.allclose(rebuilt, F.layer_norm(full, (width + missing,), eps=1e-6), atol=1e-5)
    else:
        assert torch.allclose(full * stats_full, F.rms_norm(full, (width + missing,), eps=1e-6), atol=1e-5)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("closed", [("attention",), ("ffn",), ("attention", "ffn")])
def test_parallel_branches_leave_the_sum_then_the_stream(frontend, closed):
    """ViT-22B's parallel block: one linear split into the MLP's input and q/k/v becomes one
    linear per part, so both are sites; a closed branch leaves ``attn + mlp``, and with both
    closed the whole block leaves the stream (the second one finds the sum gone and leaves where
    it joined the stream)."""
    torch.manual_seed(1)
    net = HybridNet("parallel", heads=2, head_dim=4, depth=1).eval()
    prepared = hiap_fx.prepare(net, example(net, 1), hiap_fx.PruneConfig(target_macs=None, frontend=frontend))
    plan = prepared.plan
    assert len(plan.attention) == 1 and len(plan.ffn) == 1, plan.unclaimed
    sites = {"attention": plan.attention[0], "ffn": plan.ffn[0]}
    assert all(s.residual is not None and s.residual.outer is not None for s in sites.values())
    with torch.no_grad():
        for bundle in prepared.site_gates().values():
            for gate in bundle.gates().values():
                gate.logits.fill_(3.0)
        for which in closed:
            macro = "head" if which == "attention" else "ffn"
            prepared.site_gates()[sites[which].name].gates()[macro].logits.fill_(-3.0)
    compact = hiap_fx.finalize(prepared.eval())
    x = example(net, batch=3, seed=2)
    with torch.no_grad():
        assert_close_outputs(prepared(x), compact(x), rel=1e-4)
    assert hiap_fx.count_macs(compact, example(net, 1)) == prepared.hard_macs()
    if len(closed) == 2:  # the stem and the classifier are all that is left
        assert "scaled_dot_product_attention" not in compact.code and compact.code.count("linear(") == 1


@pytest.mark.parametrize("form", ["sub_ln", "sub_rms", "upsampled", "parallel", "partial"])
def test_compact_hybrids_load_without_trust(form, tmp_path):
    """The functions normalisation brings in (``width_stats``, ``overlap_add``, ``no_features``)
    are on the safe list: a saved compact model loads as data and computes the same."""
    net = HybridNet(form, heads=2, head_dim=3)
    prepared = _prepare(net)
    compact = _finalizes_exactly(net, prepared, seed=4, p_off=0.5)
    hiap_fx.save(compact, tmp_path / "compact.hiap", prepared.plan)
    loaded = hiap_fx.load(tmp_path / "compact.hiap")
    x = example(net, batch=2, seed=9)
    with torch.no_grad():
        assert torch.equal(compact(x), loaded(x))
