"""finalize(): the compact model equals eval mode, costs what the cost model predicted, is
smaller, runs at any batch size and round-trips through torch.save."""

from __future__ import annotations

import io

import pytest
import timm
import torch
from conftest import assert_close_outputs, kernel_calls, site_removed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from independent_macs import independent_macs, randomise_gates
from zoo import ATTN_KINDS, FFN_KINDS, NORM_KINDS, POOL_KINDS, QKV_KINDS, SpecViT, ViTSpec, example_input

import hiap_fx


def _round_trip(module):
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qkv=st.sampled_from(QKV_KINDS), attn=st.sampled_from(ATTN_KINDS), norm=st.sampled_from(NORM_KINDS),
       ffn=st.sampled_from(FFN_KINDS), pool=st.sampled_from(POOL_KINDS), heads=st.integers(1, 4),
       head_dim=st.integers(1, 6), depth=st.integers(1, 3), hidden=st.integers(1, 24),
       qk_dims=st.booleans(), align=st.sampled_from([1, 1, 2, 4]), seed=st.integers(0, 10_000),
       p_off=st.floats(0.0, 1.0))
def test_random_configs_and_decisions(qkv, attn, norm, ffn, pool, heads, head_dim, depth, hidden,
                                      qk_dims, align, seed, p_off):
    spec = ViTSpec(qkv=qkv, attn=attn, norm=norm, ffn=ffn, pool=pool, heads=heads, head_dim=head_dim,
                   depth=depth, mlp_hidden=hidden, dim=12)
    torch.manual_seed(0)
    model = SpecViT(spec).eval()
    x = example_input(spec, batch=2)
    prepared = hiap_fx.prepare(model, x, hiap_fx.PruneConfig(qk_dims=qk_dims, align=align)).eval()
    randomise_gates(prepared, seed, p_off)
    compact = hiap_fx.finalize(prepared)  # checks output and MACs on x itself
    hard = prepared.hard_macs()
    assert hiap_fx.count_macs(compact, x) == hard == independent_macs(prepared)
    # one kernel call per attention that is not removed, whatever widths its heads kept
    assert kernel_calls(compact) == sum(not site_removed(prepared, s) for s in prepared.plan.attention)
    closed = any(not bool(g.hard().all()) for g in prepared.gate_modules().values())
    n_model = sum(p.numel() for p in model.parameters())
    n_compact = sum(p.numel() for p in compact.parameters())
    # fewer parameters exactly when fewer MACs (dims closed inside a head narrower than the
    # widest live head are padded back: neither parameters nor MACs shrink then)
    assert n_compact < n_model if hard < prepared.dense_macs else n_compact == n_model
    assert hard <= prepared.dense_macs and (closed or hard == prepared.dense_macs)
    assert not any("hiap_gates" in n for n, _ in compact.named_modules())
    x3 = example_input(spec, batch=3, seed=1)
    with torch.no_grad():
        want = prepared(x3)
        got = compact(x3)
        assert_close_outputs(want, got, rel=1e-4)
        again = _round_trip(compact)(x3)
    assert torch.equal(again, got)


def test_all_open_is_the_original_graph():
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2).eval()
    x = torch.randn(2, 3, 64, 64)
    compact = hiap_fx.finalize(hiap_fx.prepare(model, x).eval())
    assert sum(p.numel() for p in compact.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert_close_outputs(model(x), compact(x), rel=1e-6)


def test_heads_of_different_widths_run_in_one_padded_sdpa():
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=1).eval()
    x = torch.randn(2, 3, 64, 64)
    prepared = hiap_fx.prepare(model, x).eval()
    dims = prepared.gate_modules()["blocks.0.attn.head_dim"]
    with torch.no_grad():
        dims.logits.view(3, 64)[0, 32:] = -3.0  # head 0 keeps 32 dims, heads 1 and 2 keep 64
        dims.logits.view(3, 64)[1, 16:] = -3.0  # head 1 keeps 16
        dims.logits.view(3, 64)[2, 40:] = -3.0  # head 2 keeps 40: every head padded to 40
    compact = hiap_fx.finalize(prepared)
    sdpa = [n for n in compact.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert len(sdpa) == 1  # one kernel call whatever the widths
    assert abs(sdpa[0].kwargs["scale"] - 64 ** -0.5) < 1e-12
    assert compact.get_parameter("blocks.0.attn.proj.weight").shape[1] == 3 * 40
    assert hiap_fx.count_macs(compact, x) == prepared.hard_macs()
    # the cost model says what runs: v rows and output columns are 3 heads x 40, not 32+16+40;
    # the kernel pads v back to the q/k width (CPU flash attention needs one head dim), so it
    # saves nothing
    v = next(n for n in compact.graph.nodes if "scaled_dot_product" in str(n.target)).args[2]
    assert v.target is torch.nn.functional.pad and v.args[1] == (0, 24)
    assert prepared.dense_macs - prepared.hard_macs() == 2 * 17 * 2 * 192 * (3 * 64 - 3 * 40)


def test_closed_sub_layers_leave_the_residual_stream():
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2).eval()
    x = torch.randn(2, 3, 64, 64)
    prepared = hiap_fx.prepare(model, x).eval()
    gates = prepared.gate_modules()
    with torch.no_grad():
        gates["blocks.1.mlp.ffn"].logits.fill_(-3.0)
        gates["blocks.0.attn.head"].logits.fill_(-3.0)
    compact = hiap_fx.finalize(prepared)
    names = {n for n, _ in compact.named_parameters()}
    assert not any(n.startswith("blocks.1.mlp.") for n in names)
    assert not any(n.startswith("blocks.0.attn.") for n in names)
    assert hiap_fx.count_macs(compact, x) == prepared.hard_macs()


def test_finalize_does_not_touch_the_prepared_model():
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=1).eval()
    x = torch.randn(2, 3, 64, 64)
    prepared = hiap_fx.prepare(model, x).eval()
    randomise_gates(prepared, 0)
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    hiap_fx.finalize(prepared)
    after = prepared.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_compact_exports_to_onnx(tmp_path):
    import onnxruntime

    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=1).eval()
    x = torch.randn(2, 3, 64, 64)
    prepared = hiap_fx.prepare(model, x).eval()
    randomise_gates(prepared, 4)
    compact = hiap_fx.finalize(prepared)
    path = tmp_path / "compact.onnx"
    torch.onnx.export(compact, (x,), str(path), dynamo=True)
    session = onnxruntime.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = compact(x)
    assert_close_outputs(want, torch.from_numpy(got), rel=1e-4)


def test_compact_exports_with_torch_export():
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=1).eval()
    x = torch.randn(2, 3, 64, 64)
    prepared = hiap_fx.prepare(model, x).eval()
    randomise_gates(prepared, 1)
    compact = hiap_fx.finalize(prepared)
    exported = torch.export.export(compact, (x,))
    with torch.no_grad():
        assert_close_outputs(compact(x), exported.module()(x), rel=1e-5)
    # no stale attributes: parameters sit in plain containers, e.g. no Linear.in_features
    assert type(compact.get_submodule("blocks.0.attn.qkv")) is torch.nn.Module


def test_verification_catches_a_wrong_result(monkeypatch):
    from hiap_fx.passes import slice as slice_pass

    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=1).eval()
    x = torch.randn(2, 3, 64, 64)
    prepared = hiap_fx.prepare(model, x).eval()
    randomise_gates(prepared, 2)
    original = slice_pass.slice_ffn

    def broken(ctx, site):  # forget to slice the FFNs: closed neurons stay active
        return None

    monkeypatch.setattr(slice_pass, "slice_ffn", broken)
    with pytest.raises(hiap_fx.HiapError, match="finalize check failed.*in float64"):
        hiap_fx.finalize(prepared)
    monkeypatch.setattr(slice_pass, "slice_ffn", original)
    hiap_fx.finalize(prepared)


def test_rounding_above_the_tolerance_is_told_apart_from_a_wrong_cut():
    """A float32 difference over the tolerance is checked again on float64 copies, where an exact
    cut agrees to ~1e-15: verification warns instead of refusing. (Rounding is simulated by a
    compact model that rounds its float32 output to bfloat16.)"""
    from hiap_fx.passes.verify import verify_compact

    class Rounded(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)
            return y.bfloat16().float() if y.dtype == torch.float32 else y

    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2).eval()
    x = torch.randn(2, 3, 64, 64)
    prepared = hiap_fx.prepare(model, x).eval()
    randomise_gates(prepared, 3)
    compact = hiap_fx.finalize(prepared)
    with pytest.warns(hiap_fx.HiapWarning, match="in float64 the two agree"):
        verify_compact(Rounded(compact), prepared, (x,), rtol=1e-6)
    assert next(compact.parameters()).dtype == torch.float32  # the float64 run used copies


@pytest.mark.parametrize("name,kwargs,size", [
    ("deit_tiny_patch16_224", dict(img_size=64, depth=2), 64),
    ("cait_xxs24_224", dict(img_size=64, depth=1, depth_token_only=1), 64),
])
def test_prepared_at_batch_one(name, kwargs, size):
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    prepared = hiap_fx.prepare(model, x).eval()
    randomise_gates(prepared, 3)
    compact = hiap_fx.finalize(prepared)
    x4 = torch.randn(4, 3, size, size)
    with torch.no_grad():
        assert_close_outputs(prepared(x4), compact(x4), rel=1e-4)


def test_save_load_without_the_model_class(tmp_path):
    import subprocess
    import sys

    from zoo import FACTORIES

    model = FACTORIES["tiny_vit_functional"]()
    x = example_input(model, batch=2)
    prepared = hiap_fx.prepare(model, x).eval()
    randomise_gates(prepared, 5)
    compact = hiap_fx.finalize(prepared)
    path = tmp_path / "compact.pt"
    hiap_fx.save(compact, path, prepared.plan)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(compact(x), tmp_path / "y.pt")
    # a fresh interpreter that never imports the zoo (the model's classes are not available)
    code = ("import torch, hiap_fx, sys; m, plan = hiap_fx.load(sys.argv[1], with_plan=True); "
            "x = torch.load(sys.argv[2]); y = torch.load(sys.argv[3]); "
            "assert 'tests' not in ''.join(sys.modules); "
            # equal up to float reassociation: the child may run kernels with another thread count
            "assert torch.allclose(m(x), y, rtol=1e-5, atol=1e-6), 'different'; "
            "print(plan.model, len(plan.attention))")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [prepared.plan.model, str(len(prepared.plan.attention))]


def test_cli_finalize_and_bench(tmp_path, capsys):
    from hiap_fx.app.cli import main

    model = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2).eval()
    x = torch.randn(1, 3, 32, 32)
    prepared = hiap_fx.prepare(model, x).eval()
    randomise_gates(prepared, 6)
    hiap_fx.save(prepared, tmp_path / "prepared.pt")  # data: hiap-fx finalize reads it without unpickling
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    assert main(["finalize", str(tmp_path / "prepared.pt"), "--out", str(tmp_path / "compact.pt")]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["bench", "deit_tiny_patch16_224", "--kwargs", '{"img_size": 32, "depth": 2}',
                 "--weights", str(tmp_path / "dense.pt"), "--compact", str(tmp_path / "compact.pt"),
                 "--input-size", "3,32,32", "--batches", "1", "2", "--seconds", "0.2"]) == 0
    out = capsys.readouterr().out
    assert f"{prepared.dense_macs:,} -> {prepared.hard_macs():,}" in out
    assert "| 2 |" in out


def test_head_selection_indices_are_buffers():
    """Index tensors that select live heads of bias tables move with the module (.to(device))."""
    model = timm.create_model("beit_base_patch16_224", img_size=32, depth=1).eval()
    x = torch.randn(2, 3, 32, 32)
    prepared = hiap_fx.prepare(model, x).eval()
    with torch.no_grad():
        prepared.gate_modules()["blocks.0.attn.head"].logits[[1, 5, 6]] = -3.0
    compact = hiap_fx.finalize(prepared)
    selects = [n for n in compact.graph.nodes if n.target == "index_select"]
    assert selects and all(n.args[2].op == "get_attr" for n in selects)
    assert not any(n.target is torch.tensor for n in compact.graph.nodes)
