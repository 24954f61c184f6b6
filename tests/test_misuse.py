"""Wrong results that used to pass silently, and misuse: each is now a clear error or correct.

Forward arguments fixed at capture, ``concrete_args``, a batch size fixed by torch.export,
shared weights, unreachable or missed budgets, output container types, and the data forms and
run-directory rules of ``prune`` and ``hiap-fx prune``."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from independent_macs import randomise_gates
from zoo import SpecViT, ViTSpec, example_input

import hiap_fx

SPEC = ViTSpec(depth=2, dim=16, heads=2, mlp_hidden=32, patch=4, img_size=8)


def _vit() -> SpecViT:
    torch.manual_seed(0)
    return SpecViT(SPEC).eval()


class WithFlags(nn.Module):
    """A timm-like forward with defaulted flags (``pre_logits``) and a mode string."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = _vit()

    def forward(self, x, pre_logits=False, mode="plain"):
        y = self.vit(x)
        if pre_logits:
            return y * 0
        return y * 2 if mode == "double" else y


class RequiredMode(WithFlags):
    def forward(self, x, mode):  # a required non-tensor argument
        return self.vit(x) * (3 if mode == "fast" else 1)


def _data(n: int = 32, batch: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, *example_input(SPEC).shape[1:], generator=g)
    ys = torch.randint(0, 10, (n,), generator=g)
    return [(xs[i:i + batch], ys[i:i + batch]) for i in range(0, n, batch)]


# --- 3: forward arguments fixed at capture ------------------------------------------------------


def test_fixed_arguments_keep_their_names_and_refuse_other_values(tmp_path):
    model = WithFlags().eval()
    x = example_input(SPEC, batch=2)
    prepared = hiap_fx.prepare(model, x)
    randomise_gates(prepared, 0, 0.3)
    compact = hiap_fx.finalize(prepared.eval())
    hiap_fx.save(compact, tmp_path / "c.pt")
    loaded = hiap_fx.load(tmp_path / "c.pt")
    for module in (prepared, compact, loaded):
        graph_forward = module.graph_module.forward if module is prepared else module.forward
        assert list(inspect.signature(graph_forward).parameters) == ["x", "pre_logits", "mode"]
        with torch.no_grad():
            want = module(x)
            assert torch.equal(module(x, False, "plain"), want)
            assert torch.equal(module(x, pre_logits=False), want)
            for call in (lambda: module(x, True), lambda: module(x, pre_logits=True),
                         lambda: module(x, False, "double"), lambda: module(x, mode="double")):
                with pytest.raises(hiap_fx.InputError, match="was fixed to .*concrete_args"):
                    call()


# --- 4: concrete_args ---------------------------------------------------------------------------


def test_concrete_args_are_used_by_the_reference_run_and_the_graph():
    model = WithFlags().eval()
    x = example_input(SPEC, batch=2)
    prepared = hiap_fx.prepare(model, x, hiap_fx.PruneConfig(concrete_args={"mode": "double"}))
    assert prepared.plan.frontend == "fx"  # the fx capture matched its reference: no fallback
    with torch.no_grad():
        assert torch.allclose(prepared(x), model(x, mode="double"))
        assert torch.allclose(prepared(x, mode="double"), model(x, mode="double"))
        with pytest.raises(hiap_fx.InputError, match="'mode' was fixed to 'double'"):
            prepared(x, mode="plain")


def test_a_required_non_tensor_argument_with_concrete_args():
    model = RequiredMode().eval()
    x = example_input(SPEC, batch=2)
    for frontend in ("fx", "export"):
        prepared = hiap_fx.prepare(model, x, hiap_fx.PruneConfig(concrete_args={"mode": "fast"},
                                                                 frontend=frontend))
        with torch.no_grad():
            assert torch.allclose(prepared(x), model(x, "fast"), atol=1e-6)
            assert torch.allclose(prepared(x, "fast"), model(x, "fast"), atol=1e-6)
        compact = hiap_fx.finalize(prepared.eval())
        with pytest.raises(hiap_fx.InputError, match="'mode'"):
            compact(x, "slow")


# --- 5: a batch size fixed by torch.export ------------------------------------------------------


class LenBatch(nn.Module):
    """``nn.TransformerEncoder`` ViT whose class token is expanded with ``len(x)``."""

    def __init__(self, use_len: bool) -> None:
        super().__init__()
        self.use_len = use_len
        self.embed = nn.Linear(12, 16)
        self.cls = nn.Parameter(torch.zeros(1, 1, 16))
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        tokens = self.embed(x)
        batch = len(x) if self.use_len else x.shape[0]
        tokens = torch.cat([self.cls.expand(batch, -1, -1), tokens], 1)
        return self.head(self.encoder(tokens)[:, 0])


def test_export_fixing_the_batch_size_is_refused_at_prepare_with_the_fix():
    x = torch.randn(3, 6, 12)
    with pytest.raises(hiap_fx.CaptureError, match=r"fixed the batch size.*x\.shape\[0\]"):
        hiap_fx.prepare(LenBatch(use_len=True).eval(), x)
    prepared = hiap_fx.prepare(LenBatch(use_len=False).eval(), x)  # the fix: every batch size works
    compact = hiap_fx.finalize(prepared.eval())
    for batch in (1, 5):
        xb = torch.randn(batch, 6, 12)
        with torch.no_grad():
            assert torch.allclose(compact(xb), prepared.eval()(xb), atol=1e-5)


# --- 6: shared weights --------------------------------------------------------------------------


class _Attn(nn.Module):
    def __init__(self, d: int = 16, h: int = 2) -> None:
        super().__init__()
        self.h, self.qkv, self.proj = h, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class AttentionCalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mlp1, self.mlp2, self.head = _Attn(), _Mlp(), _Mlp(), nn.Linear(16, 4)

    def forward(self, x):
        x = x + self.attn(x)
        x = x + self.mlp1(x)
        x = x + self.attn(x)
        return self.head((x + self.mlp2(x)).mean(1))


class SharedLinear(AttentionCalledTwice):
    def __init__(self) -> None:
        super().__init__()
        self.attn2 = _Attn()
        self.mlp2.fc1 = self.mlp1.fc1  # one nn.Linear in two FFNs

    def forward(self, x):
        x = x + self.attn(x)
        x = x + self.mlp1(x)
        x = x + self.attn2(x)
        return self.head((x + self.mlp2(x)).mean(1))


@pytest.mark.parametrize("cls, names", [(AttentionCalledTwice, "attn.qkv.weight"),
                                        (SharedLinear, "mlp1.fc1.weight")])
def test_shared_weights_are_refused_at_prepare_with_the_sites(cls, names):
    with pytest.raises(hiap_fx.DiscoveryError, match=f"shared weights.*{names}.*own copy"):
        hiap_fx.prepare(cls().eval(), torch.randn(2, 5, 16))


# --- 7: budgets ---------------------------------------------------------------------------------


def test_an_unreachable_target_is_refused_with_the_minimum():
    x = example_input(SPEC, batch=2)
    prepared = hiap_fx.prepare(_vit(), x)
    floor = prepared.min_macs() / prepared.dense_macs
    assert 0.0 < floor < 0.5
    with pytest.raises(hiap_fx.BudgetError, match=f"target_macs={floor / 2} cannot be reached.*"
                                                  f">= {floor:.3f}"):
        hiap_fx.prepare(_vit(), x, hiap_fx.PruneConfig(target_macs=floor / 2))


def test_a_missed_budget_is_warned_and_reported():
    coarse = hiap_fx.PruneConfig(target_macs=0.6, head_dims=False, neurons=False)  # whole units only
    with pytest.warns(hiap_fx.HiapWarning, match="budget missed"):
        result = hiap_fx.prune(_vit(), _data(), coarse, steps=2, progress=False)
    assert abs(result.report.target_gap_pp) > 100 * 0.005
    assert result.report.target_gap_pp == pytest.approx(100 * (result.report.kept_ratio - 0.6))


def test_a_landed_budget_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", hiap_fx.HiapWarning)
        result = hiap_fx.prune(_vit(), _data(), hiap_fx.PruneConfig(target_macs=0.6), steps=40,
                               progress=False)
    assert abs(result.report.target_gap_pp) <= 0.5


# --- 8: output containers -----------------------------------------------------------------------


def test_a_plain_module_returning_a_model_output_keeps_its_type(tmp_path):
    from transformers import modeling_outputs as outputs


    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = _vit()

        def forward(self, x):
            return outputs.ImageClassifierOutput(logits=self.vit(x))

    x = example_input(SPEC, batch=2)
    prepared = hiap_fx.prepare(Wrapped().eval(), x)
    randomise_gates(prepared, 0, 0.3)
    compact = hiap_fx.finalize(prepared.eval())
    hiap_fx.save(compact, tmp_path / "c.pt")
    for module in (prepared, compact, hiap_fx.load(tmp_path / "c.pt")):
        out = module(x)
        assert type(out) is outputs.ImageClassifierOutput
        assert out.logits.shape == (2, 10) and torch.equal(out[0], out.logits)


# --- 10: run directories and resuming -----------------------------------------------------------


def test_resume_refuses_a_changed_length(tmp_path):
    ck = tmp_path / "ck.pt"
    hiap_fx.prune(_vit(), _data(), hiap_fx.PruneConfig(target_macs=0.6), steps=6, checkpoint=ck,
                  checkpoint_every=2, stop_after=2, progress=False)
    with pytest.raises(hiap_fx.InputError, match="started for 6 steps, 9 were asked"):
        hiap_fx.prune(ck, _data(), steps=9, progress=False)
    with pytest.raises(hiap_fx.InputError, match="another config"):
        hiap_fx.prune(ck, _data(), hiap_fx.PruneConfig(target_macs=0.5), progress=False)
    result = hiap_fx.prune(ck, _data(), steps=6, progress=False)  # the same length is fine
    assert result.report.steps == 6


def test_cli_prune_refuses_an_existing_run_unless_resume_or_overwrite(tmp_path, capsys, monkeypatch):
    from hiap_fx.app import cli

    out = tmp_path / "run"
    calls: list = []

    def fake_prune(model, *args, **kwargs):  # the run directory rules act before any training
        calls.append(model)
        raise hiap_fx.InputError("stop here")

    hiap_fx.prune(_vit(), _data(), hiap_fx.PruneConfig(target_macs=0.6), steps=6,
                  checkpoint=out / "checkpoint.pt", checkpoint_every=2, stop_after=2, progress=False)
    monkeypatch.setattr("hiap_fx.training.prune.prune", fake_prune)
    monkeypatch.setattr("hiap_fx.app.data.load_data", lambda *a, **k: (_data(), _data()))
    zoo_file = str(Path(__file__).with_name("zoo.py"))
    base = ["prune", "--model", f"{zoo_file}:tiny_vit_separate", "--data", "fashion-mnist", "--out", str(out),
            "--quiet"]
    assert cli.main(base) == 2
    assert "already holds a pruning run" in capsys.readouterr().err and not calls
    assert cli.main(base + ["--resume", "--target", "0.3"]) == 2
    assert "--target 0.6, not 0.3" in capsys.readouterr().err and not calls
    assert cli.main(base + ["--resume", "--steps", "9"]) == 2
    assert "6 steps, not 9" in capsys.readouterr().err and not calls
    assert cli.main(base + ["--resume"]) == 2 and calls == [str(out / "checkpoint.pt")]
    assert cli.main(base + ["--overwrite"]) == 2 and not (out / "checkpoint.pt").exists()


# --- 11: data forms and data failures -----------------------------------------------------------


def test_empty_data_and_bad_lengths_are_typed_errors():
    with pytest.raises(hiap_fx.DataError, match="no batches"):
        hiap_fx.prune(_vit(), [], progress=False)
    with pytest.raises(hiap_fx.DataError, match="no batches"):
        hiap_fx.prune(_vit(), [], steps=3, progress=False)
    with pytest.raises(hiap_fx.InputError, match="epochs must be > 0"):
        hiap_fx.prune(_vit(), _data(), epochs=0, progress=False)
    with pytest.raises(hiap_fx.InputError, match="epochs must be > 0"):
        hiap_fx.prune(_vit(), _data(), epochs=-1, progress=False)
    with pytest.raises(hiap_fx.DataError, match="eval_data yielded no batches"):
        hiap_fx.prune(_vit(), _data(), steps=1, eval_data=[], progress=False)


def test_dict_batches():
    data = _data()
    whole_dicts = [{"pixel_values": x, "labels": y} for x, y in data]
    with pytest.raises(hiap_fx.DataError, match=r"dict with keys \['labels', 'pixel_values'\].*\(inputs, targets\)"):
        hiap_fx.prune(_vit(), whole_dicts, steps=2, progress=False)
    keyword_inputs = [({"x": x}, y) for x, y in data]
    with pytest.raises(hiap_fx.DataError, match="example_inputs="):
        hiap_fx.prune(_vit(), keyword_inputs, steps=2, progress=False)
    result = hiap_fx.prune(_vit(), keyword_inputs, hiap_fx.PruneConfig(target_macs=0.7), steps=4,
                           eval_data=keyword_inputs, example_inputs=data[0][0][:2], progress=False)
    assert 0.0 <= result.report.compact_accuracy <= 1.0 and result.report.dense_accuracy is not None
    from hiap_fx.training.classify import evaluate  # evaluate accepts the same forms as training

    assert evaluate(result.compact, keyword_inputs) == evaluate(result.compact, data)


def test_resume_with_a_shorter_loader_is_a_typed_error(tmp_path):
    ck = tmp_path / "ck.pt"
    hiap_fx.prune(_vit(), _data(n=32), hiap_fx.PruneConfig(target_macs=0.6), steps=8, checkpoint=ck,
                  checkpoint_every=3, stop_after=3, progress=False)
    with pytest.raises(hiap_fx.DataError, match="resuming at batch 3 of epoch 0.*only 2 batches"):
        hiap_fx.prune(ck, _data(n=16), progress=False)


class FlakyLoader:
    """Fails with an I/O error at the ``fail_at``-th batch it yields (counted over all epochs)."""

    def __init__(self, data, fail_at: int) -> None:
        self.data, self.fail_at, self.served = data, fail_at, 0

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        for batch in self.data:
            if self.served == self.fail_at:
                raise OSError("Input/output error: /mnt/data/shard-0007.tar")
            self.served += 1
            yield batch


def test_a_loader_failing_mid_run_names_step_epoch_and_checkpoint(tmp_path):
    ck = tmp_path / "ck.pt"
    # 4 batches per epoch; prepare reads one for its example inputs, so the 7th batch is step 5
    with pytest.raises(hiap_fx.DataError, match=r"failed at step 5 \(epoch 1, batch 2\): OSError: "
                                                r"Input/output error.*ck.pt \(step 4\)") as info:
        hiap_fx.prune(_vit(), FlakyLoader(_data(), fail_at=6), hiap_fx.PruneConfig(target_macs=0.6),
                      steps=10, finetune_steps=0, checkpoint=ck, checkpoint_every=2, progress=False)
    assert isinstance(info.value.__cause__, OSError)
    resumed = hiap_fx.prune(ck, _data(), progress=False)  # the named checkpoint resumes
    assert resumed.report.steps == 10


class KeywordOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vit = _vit()

    def forward(self, x, *, features: bool = False):
        return self.vit(x) * (0 if features else 1)


class VarKeywords(KeywordOnly):
    def forward(self, x, scale=1.0, **kwargs):
        return self.vit(x) * scale


class VarPositional(KeywordOnly):
    def forward(self, x, *extra):
        return self.vit(x)


class OptionalMask(KeywordOnly):
    def forward(self, x, mask=None):
        y = self.vit(x)
        return y if mask is None else y * mask


@pytest.mark.parametrize("cls, bad_call", [
    (KeywordOnly, lambda m, x: m(x, features=True)),
    (VarKeywords, lambda m, x: m(x, 2.0)),
    (VarPositional, None),
    (OptionalMask, lambda m, x: m(x, torch.ones(1))),
])
def test_unusual_signatures_survive_prepare_finalize_save_and_load(tmp_path, cls, bad_call):
    model = cls().eval()
    x = example_input(SPEC, batch=2)
    prepared = hiap_fx.prepare(model, x)
    randomise_gates(prepared, 2, 0.3)
    compact = hiap_fx.finalize(prepared.eval())
    hiap_fx.save(compact, tmp_path / "c.pt")
    loaded = hiap_fx.load(tmp_path / "c.pt")
    with torch.no_grad():
        assert torch.allclose(loaded(x), compact(x), atol=1e-6)
        assert torch.allclose(prepared(x), compact(x), atol=1e-5)
    for module in (prepared, compact, loaded):
        if bad_call is not None:
            with pytest.raises(hiap_fx.InputError, match="was fixed to"):
                bad_call(module, x)
