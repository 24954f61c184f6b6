"""The prepared module is an ordinary nn.Module; the CLI prints plans; import stays light."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import torch
from zoo import SpecViT, ViTSpec, example_input

import hiap_fx
from hiap_fx.app.cli import main

ZOO = os.path.join(os.path.dirname(__file__), "zoo.py")


def test_prepared_pickles_trains_and_follows_train_eval():
    spec = ViTSpec(drop_path=0.5, depth=2)
    model = SpecViT(spec).eval()
    prepared = hiap_fx.prepare(model, example_input(spec, 1))
    x = example_input(spec, 5, seed=2)
    buf = io.BytesIO()
    torch.save(prepared, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(x), prepared(x))
    prepared.train()
    torch.manual_seed(0)
    a = prepared(x)
    torch.manual_seed(1)
    b = prepared(x)
    assert not torch.equal(a, b), "DropPath must stay stochastic in train mode"
    a.sum().backward()
    assert all(p.grad is not None for p in prepared.parameters() if p.requires_grad)


def test_import_is_light():
    code = "import hiap_fx, sys; print(sorted(m for m in ('timm', 'transformers', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_inspect_factory(capsys):
    assert main(["inspect", f"{ZOO}:tiny_vit_separate", "--input-size", "3,16,16"]) == 0
    out = capsys.readouterr().out
    assert "attention sites: 2" in out and "FFN sites: 2" in out and "MACs" in out


def test_cli_inspect_json(capsys):
    assert main(["inspect", f"{ZOO}:tiny_vit_functional", "--input-size", "3,16,16", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [a["num_heads"] for a in plan["attention"]] == [5, 5]


def test_cli_inspect_timm_name(capsys):
    assert main(["inspect", "deit_tiny_patch16_224", "--kwargs", '{"img_size": 32, "depth": 2}',
                 "--input-size", "3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.attn" in out and "MAC formula" in out
    # the per-site formula of an FFN: (fc1 + fc2) x kept neurons, times batch and tokens
    assert "blocks.1.mlp: 384*B*N*blocks.1.mlp.n*blocks.1.mlp.on" in out
    assert "total at the example input, all on: 5,224,704" in out


def test_cli_reports_errors(capsys):
    assert main(["inspect", "no_such_model_anywhere"]) == 2
    assert "hiap-fx: error" in capsys.readouterr().err


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "hiap_fx.app.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "inspect" in out and "coverage" in out


def test_coverage_isolated_rows(tmp_path):
    """Each model in its own process: an ok row, a refusal and a skipped row are all tabulated."""
    from hiap_fx.app.coverage import run_coverage

    skipped = {"model": "vit_enormous", "status": "skipped", "reason": "5000M parameters > 700M"}
    table = run_coverage([(f"{ZOO}:tiny_vit_mha", {}), "not_a_model_name"], jobs=2, timeout=300,
                         extra_rows=[skipped])
    assert "other: **1/1 ok (100.0%)**" in table
    assert "timm: **0/1 ok (0.0%)**, 1 refused; 1 more skipped for size" in table
    assert "InputError" in table and "neither a timm model name" in table


def test_coverage_table(tmp_path):
    from hiap_fx.app.coverage import run_coverage

    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- coverage:start -->\nold\n<!-- coverage:end -->\ny\n")
    table = run_coverage([(f"{ZOO}:tiny_vit_mha", {})], readme=str(readme))
    assert "other: **1/1 ok (100.0%)**" in table
    assert "tiny_vit_mha" in readme.read_text() and "old" not in readme.read_text()
