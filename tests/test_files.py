"""Files are data: crafted files never run code, honest files round-trip (also in a fresh
interpreter without the model's code), every failure names the file, and writes are atomic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from independent_macs import randomise_gates
from zoo import ATTN_KINDS, FFN_KINDS, NORM_KINDS, POOL_KINDS, QKV_KINDS, SpecViT, ViTSpec, example_input

import hiap_fx
from hiap_fx.files.atomic import write_with

REPO = Path(__file__).resolve().parents[1]


def _compact(seed: int = 0, depth: int = 2, dim: int = 16):
    spec = ViTSpec(depth=depth, dim=dim, heads=2, mlp_hidden=2 * dim, patch=4, img_size=8)
    torch.manual_seed(seed)
    model = SpecViT(spec).eval()
    x = example_input(spec, batch=2)
    prepared = hiap_fx.prepare(model, x)
    randomise_gates(prepared, seed, 0.4)
    return hiap_fx.finalize(prepared.eval()), prepared, x


def _payload(tmp_path: Path):
    compact, prepared, x = _compact()
    path = tmp_path / "compact.pt"
    hiap_fx.save(compact, path, prepared.plan)
    return torch.load(path, weights_only=True), x


def _node(payload: dict, op: str) -> dict:
    return next(n for n in payload["graph"]["nodes"] if n["op"] == op)


MARKER_CODE = "open({marker!r}, 'w').write('pwned')"


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


def _crafted(tmp_path: Path, payload: dict) -> Path:
    path = tmp_path / "crafted.pt"
    torch.save(payload, path)
    return path


def test_retired_format_with_code_is_refused_unexecuted(tmp_path, marker):
    payload = {"format": "hiap_fx.compact/1", "code": f"{MARKER_CODE.format(marker=str(marker))}\n",
               "imports": f"import os; {MARKER_CODE.format(marker=str(marker))}\n", "state": {},
               "parameters": [], "leaves": {}, "training": False, "plan": None}
    with pytest.raises(hiap_fx.FileError, match="crafted.pt.*retired format"):
        hiap_fx.load(_crafted(tmp_path, payload))
    assert not marker.exists()


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "builtins.exec", "subprocess.call",
                                    "torch.load", "torch.hub.load", "torch.save", "builtins.open",
                                    "torch.ops.load_library", "torch.nn.functional.torch.load",
                                    "_operator.call", "operator.methodcaller", "operator.attrgetter",
                                    "torch.from_file", "torch.ops.aten.from_file.default",
                                    "torch.Tensor.numpy"])
def test_call_targets_off_the_allow_list_are_refused(tmp_path, marker, target):
    payload, _ = _payload(tmp_path)
    node = next(n for n in payload["graph"]["nodes"] if n["op"] == "call_function")
    node["target"] = {"function": target}
    node["args"] = {"tuple": [f"touch {marker}"]}
    with pytest.raises(hiap_fx.FileError) as info:
        hiap_fx.load(_crafted(tmp_path, payload))
    assert "crafted.pt" in str(info.value) and node["name"] in str(info.value)
    assert not marker.exists()


def test_module_named_by_the_file_is_never_imported(tmp_path, marker, monkeypatch):
    evil = tmp_path / "evil_module_xyz.py"
    evil.write_text(textwrap.dedent(f"""
        import torch
        {MARKER_CODE.format(marker=str(marker))}
        class Leaf(torch.nn.Module):
            def forward(self, x):
                return x
        def fn(x):
            return x
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    payload, x = _payload(tmp_path)
    leaf_payload = {k: v for k, v in payload.items()}
    leaf = next(iter(leaf_payload["graph"]["leaves"]))  # GELU / Dropout leaf of the compact graph
    leaf_payload["graph"]["leaves"][leaf]["class"] = "evil_module_xyz.Leaf"
    with pytest.raises(hiap_fx.FileError, match="evil_module_xyz.Leaf.*allow-list"):
        hiap_fx.load(_crafted(tmp_path, leaf_payload))
    assert not marker.exists() and "evil_module_xyz" not in sys.modules
    fn_payload, _ = _payload(tmp_path)
    _node(fn_payload, "call_function")["target"] = {"function": "evil_module_xyz.fn"}
    with pytest.raises(hiap_fx.FileError, match="evil_module_xyz.fn"):
        hiap_fx.load(_crafted(tmp_path, fn_payload))
    assert not marker.exists() and "evil_module_xyz" not in sys.modules
    # the explicit opt-in does import (and so runs the module's code): that is what trust means
    hiap_fx.load(_crafted(tmp_path, leaf_payload), trust=True)
    assert marker.exists()


@pytest.mark.parametrize("edit", ["method_dunder", "method_storage", "getattr_dunder", "getattr_grad_fn",
                                  "getattr_dynamic", "name_injection",
                                  "kwarg_injection", "placeholder_injection", "leaf_attr_method",
                                  "leaf_attr_object", "get_attr_unknown", "unknown_tag", "dtype_object"])
def test_crafted_graph_entries_are_refused(tmp_path, marker, edit):
    payload, _ = _payload(tmp_path)
    nodes = payload["graph"]["nodes"]
    method = next(n for n in nodes if n["op"] == "call_method")
    fn = next(n for n in nodes if n["op"] == "call_function")
    if edit == "method_dunder":
        method["target"] = "__class__"
    elif edit == "method_storage":
        method["target"] = "untyped_storage"
    elif edit == "getattr_dunder":
        fn["target"] = {"function": "builtins.getattr"}
        fn["args"] = {"tuple": [fn["args"]["tuple"][0], "__globals__"]}
    elif edit == "getattr_grad_fn":
        fn["target"] = {"function": "builtins.getattr"}
        fn["args"] = {"tuple": [fn["args"]["tuple"][0], "grad_fn"]}
    elif edit == "getattr_dynamic":  # the attribute name computed by the graph itself
        fn["target"] = {"function": "builtins.getattr"}
        fn["args"] = {"tuple": [fn["args"]["tuple"][0], fn["args"]["tuple"][0]]}
    elif edit == "name_injection":
        fn["name"] = f"x = 1; {MARKER_CODE.format(marker=str(marker))}; y"
    elif edit == "kwarg_injection":
        fn["kwargs"] = {"dict": [["a=1); import os; (b", 1]]}
    elif edit == "placeholder_injection":
        ph = next(n for n in nodes if n["op"] == "placeholder")
        ph["target"] = f"x=({MARKER_CODE.format(marker=str(marker))})"
    elif edit == "leaf_attr_method":
        leaf = next(iter(payload["graph"]["leaves"].values()))
        leaf["attrs"]["forward"] = "x"
    elif edit == "leaf_attr_object":
        leaf = next(iter(payload["graph"]["leaves"].values()))
        leaf["attrs"]["_forward_hooks"] = {"a": 1}
    elif edit == "get_attr_unknown":
        fn["op"], fn["target"], fn["args"] = "get_attr", "__class__.__init__", {"tuple": []}
    elif edit == "unknown_tag":
        fn["args"] = {"tuple": [{"pickle": "cos\nsystem\n"}]}
    elif edit == "dtype_object":
        fn["args"] = {"tuple": [{"dtype": "load"}]}
    with pytest.raises(hiap_fx.FileError, match="crafted.pt"):
        hiap_fx.load(_crafted(tmp_path, payload))
    assert not marker.exists()


class _Reduce:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_objects_are_never_unpickled(tmp_path, marker):
    path = tmp_path / "evil.pt"
    torch.save({"format": "hiap_fx.compact/2", "graph": _Reduce(str(marker))}, path)
    with pytest.raises(hiap_fx.FileError, match="evil.pt.*pickled Python objects.*trust=True"):
        hiap_fx.load(path)
    ck = tmp_path / "checkpoint.pt"
    torch.save({"format": "hiap_fx.prune_checkpoint/2", "prepared": _Reduce(str(marker))}, ck)
    with pytest.raises(hiap_fx.FileError, match="checkpoint.pt.*pickled"):
        hiap_fx.prune(ck, [], progress=False)
    assert not marker.exists()


def test_damaged_missing_and_foreign_files_are_named(tmp_path):
    compact, prepared, x = _compact()
    good = tmp_path / "good.pt"
    hiap_fx.save(compact, good, prepared.plan)
    data = good.read_bytes()
    cases = {"missing.pt": None, "empty.pt": b"", "truncated.pt": data[: len(data) // 2],
             "garbage.pt": os.urandom(2048)}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(hiap_fx.FileError, match=name):
            hiap_fx.load(tmp_path / name)
    torch.save(compact.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(hiap_fx.FileError, match="weights.pt is a state dict"):
        hiap_fx.load(tmp_path / "weights.pt")
    torch.save({"format": "something/else"}, tmp_path / "foreign.pt")
    with pytest.raises(hiap_fx.FileError, match="foreign.pt .*not a hiap_fx model file"):
        hiap_fx.load(tmp_path / "foreign.pt")
    for name in ("missing.pt", "truncated.pt", "weights.pt"):
        with pytest.raises(hiap_fx.FileError, match=name):
            hiap_fx.prune(tmp_path / name, [], progress=False)


def test_compact_round_trip_in_a_fresh_interpreter_without_the_model_code(tmp_path):
    import timm

    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                              drop_path_rate=0.1).eval()  # timm's DropPath stays a leaf
    x = torch.randn(2, 3, 32, 32)
    prepared = hiap_fx.prepare(model, x)
    randomise_gates(prepared, 1, 0.4)
    compact = hiap_fx.finalize(prepared.eval())
    path = tmp_path / "compact.pt"
    hiap_fx.save(compact, path, prepared.plan)
    torch.save({"x": x, "y": compact(x).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch, hiap_fx
        assert "zoo" not in sys.modules and "timm" not in sys.modules
        model, plan = hiap_fx.load({str(path)!r}, with_plan=True)
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        with torch.no_grad():
            assert torch.allclose(model(io["x"]), io["y"], atol=1e-6), "output differs"
        assert plan.model == "VisionTransformer" and not model.training
        model.train()
        model(io["x"]).sum().backward()  # trainable after loading
        print("ok", sum(p.numel() for p in model.parameters()))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", str(sum(p.numel() for p in compact.parameters()))]


def test_prepared_model_round_trips_as_data(tmp_path):
    compact, prepared, x = _compact(seed=3)
    path = tmp_path / "prepared.pt"
    hiap_fx.save(prepared, path)
    again = hiap_fx.load(path)
    assert isinstance(again, hiap_fx.PreparedModel)
    assert again.hard_macs() == prepared.hard_macs() and again.dense_macs == prepared.dense_macs
    assert again.plan == prepared.plan and again.config == prepared.config
    for key, gate in prepared.gate_modules().items():
        assert torch.equal(again.gate_modules()[key].logits, gate.logits)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), prepared.eval()(x))
        assert torch.allclose(hiap_fx.finalize(again)(x), compact(x), atol=1e-6)
    assert float(again.expected_macs()) == pytest.approx(float(prepared.expected_macs()))


def test_cli_finalize_reads_data_and_needs_opt_in_for_pickles(tmp_path, capsys):
    from hiap_fx.app.cli import main

    _, prepared, x = _compact(seed=4)
    hiap_fx.save(prepared, tmp_path / "prepared.pt")
    assert main(["finalize", str(tmp_path / "prepared.pt"), "--out", str(tmp_path / "c.pt")]) == 0
    assert torch.allclose(hiap_fx.load(tmp_path / "c.pt")(x), hiap_fx.finalize(prepared)(x), atol=1e-6)
    torch.save(prepared, tmp_path / "pickled.pt")
    capsys.readouterr()
    assert main(["finalize", str(tmp_path / "pickled.pt"), "--out", str(tmp_path / "c2.pt")]) == 2
    assert "trust" in capsys.readouterr().err
    assert main(["finalize", str(tmp_path / "pickled.pt"), "--out", str(tmp_path / "c2.pt"),
                 "--trust-file"]) == 0


def test_cli_prune_on_a_state_dict_says_what_it_is(tmp_path, capsys):
    from hiap_fx.app.cli import main

    compact, _, _ = _compact()
    torch.save(compact.state_dict(), tmp_path / "weights.pth")
    code = main(["prune", "--model", str(tmp_path / "weights.pth"), "--data", "fashion-mnist",
                 "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "weights.pth is a state dict" in err and "weights" in err


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.pt"
    compact, prepared, x = _compact()
    hiap_fx.save(compact, path, prepared.plan)
    before = path.read_bytes()

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_with(path, broken)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary left behind


def test_killed_writer_leaves_a_complete_file(tmp_path):
    """A process killed (SIGKILL) while saving leaves the previous or the new file, never half."""
    path = tmp_path / "model.pt"
    compact, prepared, x = _compact(dim=64, depth=4)
    hiap_fx.save(compact, path, prepared.plan)
    hiap_fx.save(prepared, tmp_path / "prepared.pt")
    writer = textwrap.dedent(f"""
        import hiap_fx, sys, zoo  # zoo registers its DropPath leaf as loadable
        prepared = hiap_fx.load({str(tmp_path / 'prepared.pt')!r})
        compact = hiap_fx.finalize(prepared)
        print("ready", flush=True)
        while True:
            hiap_fx.save(compact, {str(path)!r}, prepared.plan)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    for delay in (0.05, 0.3, 0.9):
        proc = subprocess.Popen([sys.executable, "-c", writer], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = hiap_fx.load(path)  # complete: the old or a new version, never a torn file
        assert torch.allclose(loaded(x), compact(x), atol=1e-6)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(qkv=st.sampled_from(QKV_KINDS), attn=st.sampled_from(ATTN_KINDS), norm=st.sampled_from(NORM_KINDS),
       ffn=st.sampled_from(FFN_KINDS), pool=st.sampled_from(POOL_KINDS), heads=st.integers(1, 3),
       qk_dims=st.booleans(), p_off=st.sampled_from([0.0, 0.4, 1.0]), seed=st.integers(0, 100))
def test_random_vits_round_trip_as_data(tmp_path, qkv, attn, norm, ffn, pool, heads, qk_dims, p_off, seed):
    """Any zoo ViT x any decisions: the compact and the prepared model survive save -> load exactly."""
    spec = ViTSpec(qkv=qkv, attn=attn, norm=norm, ffn=ffn, pool=pool, heads=heads, head_dim=4,
                   mlp_hidden=12, depth=2, dim=4 * heads, patch=4, img_size=8)
    torch.manual_seed(seed)
    x = example_input(spec, batch=2)
    prepared = hiap_fx.prepare(SpecViT(spec).eval(), x, hiap_fx.PruneConfig(qk_dims=qk_dims, target_macs=None))
    randomise_gates(prepared, seed, p_off)
    compact = hiap_fx.finalize(prepared.eval())
    hiap_fx.save(compact, tmp_path / "c.pt", prepared.plan)
    hiap_fx.save(prepared, tmp_path / "p.pt")
    loaded, plan = hiap_fx.load(tmp_path / "c.pt", with_plan=True)
    again = hiap_fx.load(tmp_path / "p.pt")
    x3 = example_input(spec, batch=3, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(x3), compact(x3))
        assert torch.equal(again.eval()(x3), prepared(x3))
    assert plan == prepared.plan and again.hard_macs() == prepared.hard_macs()
    assert hiap_fx.count_macs(loaded, x) == prepared.hard_macs()


def test_custom_operators_resolve_only_when_registered():
    from hiap_fx.files.allowlist import resolve_function

    lib = torch.library.Library("hiap_test_files", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: 2 * x, "CompositeExplicitAutograd")
    for name in ("torch.ops.hiap_test_files.twice", "torch.ops.hiap_test_files.twice.default"):
        with pytest.raises(hiap_fx.FileError, match="not on hiap_fx's allow-list"):
            resolve_function(name)  # a custom operator nobody registered
    assert resolve_function("torch.ops.aten.linear.default") is torch.ops.aten.linear.default
    assert resolve_function("torch.ops.aten.linear") is torch.ops.aten.linear
    with pytest.raises(hiap_fx.FileError):
        resolve_function("torch.ops.no_such_namespace.op")
