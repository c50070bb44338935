"""`convzoo study`: each study in a tiny configuration produces its table, JSON and figure."""
import json

import pytest
import torch
from PIL import Image

from convzoo.cli import main
from convzoo.layers.reparam import ConvNormAct, ReparamLargeKernelConv
from convzoo.train.studies import BASE_ARGS, STUDIES, StudyBudget, build_variant, markdown_table, run_study, to_json

TINY = StudyBudget(epochs=1, train_size=2, val_size=1, batch_size=2, width=16, height=16)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_each_study_changes_only_what_it_studies():
    changed = {name: {k for v in s.variants for k, val in v.model_args.items() if BASE_ARGS.get(k, object()) != val}
               for name, s in STUDIES.items()}
    assert changed["kernel-size"] == {"kernel_sizes", "small_kernel"}
    assert changed["shortcut"] == {"small_kernel", "lk_shortcut"}
    assert [v.model_args for v in STUDIES["shortcut"].variants] == [dict(small_kernel=5), dict(small_kernel=5, lk_shortcut=False)]
    assert [v.model_args["small_kernel"] for v in STUDIES["reparam"].variants] == [5, None]
    assert [v.model_args["kernel_sizes"][:2] for v in STUDIES["small-maps"].variants] == [(31, 29), (31, 29)]
    dense, dilated = STUDIES["dilated-vs-dense"].variants
    assert dense.model_args == dilated.model_args and dilated.dilated == (7, 5) and 5 * (7 - 1) + 1 == 31


def test_dilated_variant_replaces_every_large_kernel():
    dense_variant, dilated_variant = STUDIES["dilated-vs-dense"].variants
    dense, dilated = build_variant(dense_variant, 3), build_variant(dilated_variant, 3)
    assert any(isinstance(m, ReparamLargeKernelConv) for m in dense.modules())
    assert not any(isinstance(m, ReparamLargeKernelConv) for m in dilated.modules())
    convs = [m.large_kernel.conv for m in dilated.modules() if hasattr(m, "large_kernel")]
    assert convs and all(c.kernel_size == (7, 7) and c.dilation == (5, 5) and c.padding == (15, 15) for c in convs)
    assert all(isinstance(m.large_kernel, ConvNormAct) for m in dilated.modules() if hasattr(m, "large_kernel"))
    x = torch.randn(1, 3, 16, 32)
    assert dilated.eval()(x).shape == (1, 3, 16, 32)


@pytest.mark.parametrize("name", ["kernel-size", "reparam", "small-maps", "dilated-vs-dense"])
def test_tiny_study_reports_every_variant(name):
    results = run_study(name, TINY)
    assert [r.label for r in results] == [v.label for v in STUDIES[name].variants]
    assert all(len(r.miou) == 1 and 0 <= r.miou[0] <= 100 and r.params > 0 for r in results)
    table = markdown_table(name, TINY, results)
    assert table.count("\n| ") == len(results) + 1  # header + one row per variant
    data = to_json(name, TINY, results)
    assert [v["label"] for v in data["variants"]] == [r.label for r in results]


def test_cli_writes_table_json_and_figure(tmp_path, capsys):
    out = tmp_path / "studies"
    code = main(["study", "shortcut", "--epochs", "1", "--train-size", "2", "--val-size", "1", "--batch-size", "2",
                 "--width", "16", "--seeds", "0", "1", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "without shortcut (seed 1): val mIoU" in text
    data = json.loads((out / "study-shortcut.json").read_text())
    assert data["budget"]["seeds"] == [0, 1] and [len(v["miou"]) for v in data["variants"]] == [2, 2]
    assert "| with shortcut |" in (out / "study-shortcut.md").read_text()
    with Image.open(out / "study-shortcut.png") as figure:
        assert figure.width > 100 and figure.height > 100


@pytest.mark.parametrize("argv,message", [
    (["nope"], "invalid choice"),
    (["shortcut", "--train-size", "2", "--batch-size", "4"], "must hold one batch"),
    (["shortcut", "--lr", "0"], "--lr must be > 0"),
])
def test_cli_errors(tmp_path, capsys, argv, message):
    assert main(["study"] + argv + ["--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
