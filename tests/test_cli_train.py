"""End-to-end tests of `convzoo train`, `convzoo eval`, `convzoo list` and the CLI itself."""
import argparse
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _cli import read_metrics, read_state, run_cli
from PIL import Image

from convzoo.cli import build_parser
from convzoo.models import _registry

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RUN_CLI = os.path.join(HERE, "train", "run_cli.py")


def _load_tiny_model():
    spec = importlib.util.spec_from_file_location("convzoo_tests_tiny_model", os.path.join(HERE, "train", "tiny_model.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


tiny_model = _load_tiny_model()
TINY = tiny_model.NAME


@pytest.fixture
def tiny(monkeypatch):
    """Register the tiny test model for the duration of one test."""
    monkeypatch.setitem(_registry._ENTRY_POINTS, TINY, tiny_model.tiny_test_net)
    return TINY


# tiny built-in data: 24 px images, 64 training and 32 validation images
BUILTIN = ["--image-size", "24", "--train-size", "64", "--val-size", "32", "--batch-size", "16", "--threads", "1"]


def _without_timings(records):
    drop = ("train_seconds", "train_images_per_second")
    return [{k: v for k, v in record.items() if k not in drop} for record in records]


# ---------------------------------------------------------------- the CLI itself

def _command_names():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(subparsers.choices)


def test_commands_are_discovered():
    assert {"train", "eval", "list"} <= set(_command_names())


@pytest.mark.parametrize("command", [None] + _command_names())
def test_help_of_every_command(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    assert out.startswith("usage: convzoo" + ("" if command is None else f" {command}"))
    parser = build_parser()
    if command is not None:
        subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = subparsers.choices[command]
    for action in parser._actions:  # every option is explained, with its help text
        if action.help == argparse.SUPPRESS:  # kept for old scripts, not shown
            continue
        for option in action.option_strings:
            assert option in out, option
        if action.help and action.option_strings:
            assert action.help.split()[0] in out, action.help


def test_no_command_and_bad_option_are_usage_errors(capsys):
    code, _, err = run_cli([], capsys)
    assert code == 2 and "usage: convzoo" in err
    code, _, err = run_cli(["train", "--epochs", "many"], capsys)
    assert code == 2 and "--epochs: expected a positive integer, got 'many'" in err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "convzoo", "--version"], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("convzoo ")


# ---------------------------------------------------------------- training on the built-in data set

def test_train_on_builtin_data(tiny, tmp_path, capsys):
    output = str(tmp_path / "run")
    code, out, err = run_cli(["train", "--model", tiny, "--epochs", "2", "--output", output, "--model-ema", "0.9",
                           "--accum-steps", "2", "--mixup", "0.2", "--cutmix", "1.0"] + BUILTIN, capsys)
    assert code == 0, err
    records = read_metrics(output)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["step"] == 2 * (64 // 16 // 2)
    for key in ("train_loss", "train_acc", "val_top1", "val_top5", "ema_val_top1", "lr"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert "epoch 2/2 [####################] 2/2 loss" in err and "img/s" in err and "ETA" in err
    assert "val top-1/top-5" in out
    summary = json.load(open(os.path.join(output, "summary.json")))
    assert summary["epochs"] == 2 and summary["weights"] == "ema"
    expected = {"checkpoint.pt", "metrics.jsonl", "model.safetensors", "summary.json"}
    assert set(os.listdir(output)) - {"tensorboard"} == expected
    state = read_state(output)
    assert state["epoch"] == 2 and state["meta"]["model_name"] == tiny and state["model_ema"] is not None
    # a new run in the same folder starts over (and says so) instead of appending to the old metrics
    code, _, err = run_cli(["train", "--model", tiny, "--epochs", "1", "--output", output] + BUILTIN, capsys)
    assert code == 0 and "starting a new run" in err and len(read_metrics(output)) == 1


def test_train_model_args_reach_the_model(tiny, tmp_path, capsys):
    output = str(tmp_path / "run")
    code, _, err = run_cli(["train", "--model", tiny, "--model-arg", "width=4", "--model-arg", "norm=group",
                         "--epochs", "1", "--output", output] + BUILTIN, capsys)
    assert code == 0, err
    assert read_state(output)["model"]["stem.weight"].shape[0] == 4
    code, _, err = run_cli(["train", "--model", tiny, "--model-arg", "depth=3", "--output", output] + BUILTIN, capsys)
    assert code == 2 and "has no option 'depth'" in err
    code, _, err = run_cli(["train", "--model", tiny, "--model-arg", "nonsense", "--output", output] + BUILTIN, capsys)
    assert code == 2 and "expected KEY=VALUE" in err


def test_unknown_model_lists_close_names(tiny, tmp_path, capsys):
    code, _, err = run_cli(["train", "--model", "tiny_test_nett", "--output", str(tmp_path)] + BUILTIN, capsys)
    assert code == 2
    assert "unknown model 'tiny_test_nett'" in err and "did you mean tiny_test_net" in err


def test_pretrained_fine_tuning_gets_a_new_head(tiny, tmp_path, capsys):
    source = tiny_model.tiny_test_net(num_classes=10)
    source.model_name = tiny
    from convzoo import save_checkpoint

    weights = str(tmp_path / "pretrained.safetensors")
    save_checkpoint(source, weights)
    output = str(tmp_path / "run")
    code, _, err = run_cli(["train", "--model", tiny, "--pretrained", weights, "--epochs", "1", "--lr", "1e-9",
                         "--output", output] + BUILTIN, capsys)
    assert code == 0, err
    state = read_state(output)["model"]
    assert state["head.weight"].shape == (2, 8)  # the two classes of the built-in data set
    assert torch.allclose(state["stem.weight"], source.stem.weight, atol=1e-6)
    code, _, err = run_cli(["train", "--model", tiny, "--pretrained", str(tmp_path / "missing.pth"), "--output", output] + BUILTIN, capsys)
    assert code == 2 and "missing.pth" in err


# ---------------------------------------------------------------- image folders

def _picture(seed, size=(28, 20)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _image_folder(root, classes=("ants", "bees", "wasps"), per_class=4):
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(per_class):
                ext = ("jpg", "png", "webp")[i % 3]
                _picture(100 * c + i).save(os.path.join(root, split, name, f"{i}.{ext}"))
    return root


def test_train_and_eval_on_an_image_folder_with_broken_files(tiny, tmp_path, capsys):
    data = _image_folder(str(tmp_path / "data"))
    (tmp_path / "data" / "train" / "ants" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    buffer = io.BytesIO()
    _picture(7, (64, 64)).save(buffer, format="PNG")
    (tmp_path / "data" / "val" / "bees" / "truncated.png").write_bytes(buffer.getvalue()[:300])
    output = str(tmp_path / "run")
    code, out, err = run_cli(["train", "--model", tiny, "--data", data, "--image-size", "16", "--epochs", "2",
                           "--batch-size", "4", "--workers", "0", "--randaugment", "2", "9", "--output", output], capsys)
    assert code == 0, err
    assert "corrupt.jpg" in err and "truncated.png" in err
    summary = json.load(open(os.path.join(output, "summary.json")))
    assert summary["skipped_train_images"] == 1 and summary["skipped_val_images"] == 1
    assert "skipped images  1 train, 1 val" in out
    code, out, err = run_cli(["eval", "--model", tiny, "--checkpoint", os.path.join(output, "checkpoint.pt"),
                           "--data", data, "--image-size", "16", "--workers", "0"], capsys)
    assert code == 0, err
    assert "on 12 images (1 unreadable, skipped)" in out
    assert _top1(out) == round(read_metrics(output)[-1]["val_top1"], 2)  # the same weights, images and transform


def test_empty_class_folder_stops_before_training(tiny, tmp_path, capsys):
    data = _image_folder(str(tmp_path / "data"))
    os.makedirs(tmp_path / "data" / "train" / "hornets")
    code, _, err = run_cli(["train", "--model", tiny, "--data", data, "--output", str(tmp_path / "run")], capsys)
    assert code == 2
    assert os.path.join(data, "train", "hornets") in err and "holds no images" in err
    assert not os.path.exists(tmp_path / "run")


def test_unknown_val_class_stops_before_training(tiny, tmp_path, capsys):
    data = _image_folder(str(tmp_path / "data"))
    os.makedirs(tmp_path / "data" / "val" / "moths")
    _picture(1).save(str(tmp_path / "data" / "val" / "moths" / "m.png"))
    code, _, err = run_cli(["train", "--model", tiny, "--data", data, "--output", str(tmp_path / "run")], capsys)
    assert code == 2 and "classes the training split does not have: moths" in err


def test_missing_data_dir_names_the_path(tiny, tmp_path, capsys):
    missing = str(tmp_path / "no" / "such" / "dir")
    code, _, err = run_cli(["train", "--model", tiny, "--data", missing], capsys)
    assert code == 2 and f"data folder not found: {missing}" in err
    code, _, err = run_cli(["eval", "--model", tiny, "--checkpoint", str(tmp_path / "none.pt")], capsys)
    assert code == 2 and "none.pt" in err


# ---------------------------------------------------------------- kill and resume

RESUME_ARGS = ["--epochs", "3", "--lr", "3e-3", "--model-ema", "0.9", "--drop-path", "0.1"] + BUILTIN


def test_resume_after_a_crash_mid_epoch_equals_an_uninterrupted_run(tiny, tmp_path, capsys, monkeypatch):
    from convzoo.train import loop

    straight = str(tmp_path / "straight")
    assert run_cli(["train", "--model", tiny, "--output", straight] + RESUME_ARGS, capsys)[0] == 0

    crashed = str(tmp_path / "crashed")
    original = loop.Trainer._optimizer_step

    def crash_in_second_epoch(self):
        original(self)
        if self.epoch == 1 and self.step == self.steps_per_epoch + 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(loop.Trainer, "_optimizer_step", crash_in_second_epoch)
    code, _, err = run_cli(["train", "--model", tiny, "--output", crashed] + RESUME_ARGS, capsys)
    assert code == 1 and "simulated crash" in err
    assert read_state(crashed)["epoch"] == 1 and len(read_metrics(crashed)) == 1
    monkeypatch.setattr(loop.Trainer, "_optimizer_step", original)

    code, _, err = run_cli(["train", "--model", tiny, "--output", crashed, "--resume"] + RESUME_ARGS, capsys)
    assert code == 0, err
    assert "resumed from" in err and "after epoch 1" in err
    _assert_same_run(straight, crashed)


def _assert_same_run(first, second):
    a, b = read_state(first), read_state(second)
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["model_ema"]["module"]:
        assert torch.equal(a["model_ema"]["module"][key], b["model_ema"]["module"][key]), key
    for index, param_state in a["optimizer"]["state"].items():
        assert torch.equal(param_state["exp_avg"], b["optimizer"]["state"][index]["exp_avg"])
    assert _without_timings(read_metrics(first)) == _without_timings(read_metrics(second))


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny, tmp_path, capsys):
    args = ["--model", TINY, "--epochs", "3", "--lr", "3e-3", "--model-ema", "0.9", "--image-size", "24",
            "--train-size", "128", "--val-size", "32", "--batch-size", "32", "--threads", "1"]
    killed = str(tmp_path / "killed")
    marker = str(tmp_path / "marker")
    # 4 steps per epoch: the child stops after the 2nd step of the 2nd epoch (step 6 of the run),
    # writes the marker and waits; it is killed there, mid-epoch, whatever the machine's speed.
    env = {**os.environ, "PYTHONPATH": REPO, "CONVZOO_TEST_STOP_AT": f"1,6,{marker}"}
    process = subprocess.Popen([sys.executable, RUN_CLI, "train", "--output", killed] + args,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not os.path.exists(marker) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert os.path.exists(marker), process.stderr.read().decode() if process.poll() is not None else "no marker in 120 s"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(killed, "summary.json"))
    assert read_state(killed)["epoch"] == 1 and len(read_metrics(killed)) == 1  # epoch 2 was lost half-done

    code, _, err = run_cli(["train", "--output", killed, "--resume"] + args, capsys)
    assert code == 0, err
    assert "after epoch 1" in err
    straight = str(tmp_path / "straight")
    assert run_cli(["train", "--output", straight] + args, capsys)[0] == 0
    _assert_same_run(straight, killed)


def test_resume_without_checkpoint_is_a_usage_error(tiny, tmp_path, capsys):
    code, _, err = run_cli(["train", "--model", tiny, "--output", str(tmp_path / "fresh"), "--resume"] + BUILTIN, capsys)
    assert code == 2 and os.path.join(str(tmp_path / "fresh"), "checkpoint.pt") in err


# ---------------------------------------------------------------- distributed (2 processes, Gloo, CPU)

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_run_matches_single_process_training(tiny, tmp_path, capsys):
    common = ["--model", TINY, "--model-arg", "norm=group", "--epochs", "2", "--image-size", "24",
              "--train-size", "64", "--val-size", "30", "--threads", "1", "--lr", "3e-3"]
    distributed = str(tmp_path / "ddp")
    env = {**os.environ, "PYTHONPATH": REPO, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), RUN_CLI, "train", "--output", distributed, "--batch-size", "8"] + common
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    assert result.stderr.count("summary") == 0 and result.stdout.count("summary") == 1  # rank 0 only

    single = str(tmp_path / "single")
    code, _, err = run_cli(["train", "--output", single, "--batch-size", "16"] + common, capsys)
    assert code == 0, err

    ddp_records, single_records = read_metrics(distributed), read_metrics(single)
    assert all(r["ranks_in_sync"] for r in ddp_records)
    for a, b in zip(ddp_records, single_records):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_top1"] == pytest.approx(b["val_top1"])
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    ddp_state, single_state = read_state(distributed)["model"], read_state(single)["model"]
    for key in single_state:
        torch.testing.assert_close(ddp_state[key], single_state[key], rtol=1e-4, atol=1e-5, msg=key)


# ---------------------------------------------------------------- eval and list

def test_eval_and_eval_reparam_agree(tiny, tmp_path, capsys):
    output = str(tmp_path / "run")
    assert run_cli(["train", "--model", tiny, "--epochs", "1", "--output", output] + BUILTIN, capsys)[0] == 0
    reports = {}
    for name, extra in (("plain", []), ("reparam", ["--reparam"])):
        path = str(tmp_path / f"{name}.json")
        code, out, err = run_cli(["eval", "--model", tiny, "--checkpoint", os.path.join(output, "checkpoint.pt"),
                               "--batch-size", "8", "--json", path] + extra, capsys)
        assert code == 0, err
        assert "top-1" in out and "img/s" in out
        reports[name] = json.load(open(path))
    plain, reparam = reports["plain"], reports["reparam"]
    assert plain["images"] == reparam["images"] == 32  # the validation split the run was trained with
    assert reparam["top1"] == plain["top1"] and reparam["top5"] == plain["top5"]
    assert reparam["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    assert reparam["parameters"] < plain["parameters"]
    # the exported weights give the same figures
    path = str(tmp_path / "exported.json")
    code, out, err = run_cli(["eval", "--model", tiny, "--checkpoint", os.path.join(output, "model.safetensors"),
                              "--image-size", "24", "--batch-size", "8", "--json", path], capsys)
    assert code == 0, err
    exported = json.load(open(path))
    assert exported["images"] == plain["images"] and exported["top1"] == plain["top1"]
    assert exported["loss"] == pytest.approx(plain["loss"], rel=1e-6)


def test_eval_rejects_a_checkpoint_of_another_model(tiny, tmp_path, capsys, monkeypatch):
    output = str(tmp_path / "run")
    assert run_cli(["train", "--model", tiny, "--epochs", "1", "--output", output] + BUILTIN, capsys)[0] == 0
    monkeypatch.setitem(_registry._ENTRY_POINTS, "other_test_net", tiny_model.tiny_test_net)
    code, _, err = run_cli(["eval", "--model", "other_test_net", "--checkpoint", os.path.join(output, "checkpoint.pt")], capsys)
    assert code == 2 and "holds a tiny_test_net model" in err


def test_list_shows_parameters_and_flops(tiny, capsys):
    code, out, err = run_cli(["list", "tiny_*", "--input-size", "32"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["model", "params"] and lines[1].startswith(TINY)
    code, out, _ = run_cli(["list", "tiny_*", "--input-size", "32", "--json"], capsys)
    row = json.loads(out)["models"][0]
    model = tiny_model.tiny_test_net()
    assert row["params"] == sum(p.numel() for p in model.parameters())
    # stem 4x4/4 conv on 32x32 -> 8x8, then a 3x3 and a 1x1 conv, a 3x3 conv and the head
    macs = 64 * 8 * 3 * 16 + 64 * 8 * 8 * 9 + 64 * 8 * 8 + 64 * 8 * 8 * 9 + 8 * 1000
    assert row["macs"] == macs
    assert run_cli(["list", "--names-only", "tiny_*"], capsys)[1].split() == [TINY]
    code, _, err = run_cli(["list", "no_such_model*"], capsys)
    assert code == 1 and "no model matches" in err


def test_replknet_tiny_trains_and_its_reparameterized_form_scores_the_same(tmp_path, capsys):
    output = str(tmp_path / "run")
    code, _, err = run_cli(["train", "--model", "replknet_tiny", "--epochs", "1", "--image-size", "32", "--train-size", "32",
                         "--val-size", "24", "--batch-size", "16", "--threads", "1", "--amp", "bf16",
                         "--channels-last", "--grad-checkpointing", "--output", output], capsys)
    assert code == 0, err
    checkpoint = os.path.join(output, "checkpoint.pt")
    reports = []
    for extra in ([], ["--reparam"]):
        path = str(tmp_path / f"eval{len(reports)}.json")
        code, _, err = run_cli(["eval", "--model", "replknet_tiny", "--checkpoint", checkpoint, "--json", path] + extra, capsys)
        assert code == 0, err
        reports.append(json.load(open(path)))
    plain, reparam = reports
    assert plain["images"] == reparam["images"] == 24
    assert reparam["top1"] == plain["top1"] and reparam["loss"] == pytest.approx(plain["loss"], rel=1e-3, abs=1e-4)
    assert reparam["parameters"] < plain["parameters"]


def test_list_counts_a_zoo_model_like_the_analysis_module(capsys):
    import convzoo
    from convzoo.analysis import count_flops, count_params

    code, out, err = run_cli(["list", "replknet_tiny", "--input-size", "64", "--json"], capsys)
    assert code == 0, err
    row = json.loads(out)["models"][0]
    model = convzoo.create_model("replknet_tiny")
    assert row["params"] == count_params(model)
    assert row["macs"] == count_flops(model, (1, 3, 64, 64)).macs > 0


def test_failures_exit_1_and_show_a_traceback_on_request(tiny, tmp_path, capsys, monkeypatch):
    from convzoo.train import loop

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(loop.Trainer, "fit", broken)
    argv = ["train", "--model", tiny, "--output", str(tmp_path / "run")] + BUILTIN
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "failed: RuntimeError: disk on fire (run with -vv for the traceback)" in err
    code, _, err = run_cli(["-vv"] + argv, capsys)
    assert code == 1 and "Traceback (most recent call last)" in err


# ---------------------------------------------------------------- what a new user ran into

def _top1(out):
    return float(next(line for line in out.splitlines() if "top-1" in line).split()[-1].rstrip("%"))


def test_eval_uses_the_training_resolution_classes_and_data_stored_in_the_checkpoint(tiny, tmp_path, capsys):
    data = _image_folder(str(tmp_path / "data"))
    output = str(tmp_path / "run")
    code, _, err = run_cli(["train", "--model", tiny, "--data", data, "--image-size", "16", "--epochs", "1",
                         "--batch-size", "4", "--workers", "0", "--output", output], capsys)
    assert code == 0, err
    results = {}
    for name in ("checkpoint.pt", "model.safetensors"):
        code, out, err = run_cli(["eval", "--model", tiny, "--checkpoint", os.path.join(output, name), "--data", data,
                               "--workers", "0"], capsys)
        assert code == 0, err
        assert "resolution  16x16 (stored in the checkpoint)" in out
        results[name] = _top1(out)
    assert results["checkpoint.pt"] == results["model.safetensors"] == round(read_metrics(output)[-1]["val_top1"], 2)
    code, out, _ = run_cli(["eval", "--model", tiny, "--checkpoint", os.path.join(output, "model.safetensors"),
                         "--data", data, "--workers", "0", "--image-size", "20"], capsys)
    assert code == 0 and "resolution  20x20 (--image-size)" in out
    # without --data, the file says where it was trained; a folder of other classes is refused
    code, _, err = run_cli(["eval", "--model", tiny, "--checkpoint", os.path.join(output, "model.safetensors")], capsys)
    assert code == 2 and "was trained on an image folder" in err and "pass --data" in err
    other = _image_folder(str(tmp_path / "other"), classes=("cats", "dogs", "mice"))
    code, _, err = run_cli(["eval", "--model", tiny, "--checkpoint", os.path.join(output, "checkpoint.pt"),
                         "--data", other, "--workers", "0"], capsys)
    assert code == 2 and "cats, dogs, mice" in err and "ants, bees, wasps" in err


def test_a_training_set_smaller_than_a_batch_lowers_the_batch_size_with_a_notice(tiny, tmp_path, capsys):
    data = _image_folder(str(tmp_path / "data"), per_class=3)  # 9 training images, default batch 64
    output = str(tmp_path / "run")
    code, _, err = run_cli(["train", "--model", tiny, "--data", data, "--image-size", "16", "--epochs", "1",
                         "--workers", "0", "--output", output], capsys)
    assert code == 0, err
    assert "9 images, fewer than one step of --batch-size 64: using --batch-size 9" in err
    assert read_state(output)["step"] == 1


def test_a_new_run_interrupted_at_once_keeps_the_old_run_and_a_failed_run_leaves_no_folder(tiny, tmp_path, capsys, monkeypatch):
    from convzoo.train import loop

    output = str(tmp_path / "run")
    assert run_cli(["train", "--model", tiny, "--output", output, "--epochs", "1"] + BUILTIN, capsys)[0] == 0
    before = {name: open(os.path.join(output, name), "rb").read() for name in ("metrics.jsonl", "summary.json")}

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.Trainer, "fit", interrupted)
    code, _, err = run_cli(["train", "--model", tiny, "--output", output, "--epochs", "1"] + BUILTIN, capsys)
    assert code == 130
    assert {name: open(os.path.join(output, name), "rb").read() for name in before} == before
    fresh = str(tmp_path / "fresh")
    assert run_cli(["train", "--model", tiny, "--output", fresh, "--epochs", "1"] + BUILTIN, capsys)[0] == 130
    assert not os.path.exists(fresh)


@pytest.mark.parametrize("argv, message", [
    pytest.param(["train", "--image-size", "-5"], "expected a positive integer, got -5", id="train-image-size"),
    pytest.param(["train", "--batch-size", "0"], "expected a positive integer, got 0", id="train-batch-size"),
    pytest.param(["eval", "--model", "x", "--checkpoint", "x", "--image-size", "0"], "expected a positive integer", id="eval-image-size"),
    pytest.param(["list", "--input-size", "0"], "expected a positive integer, got 0", id="list-input-size"),
])
def test_sizes_are_checked_before_any_work(argv, message, tmp_path, capsys):
    code, out, err = run_cli(argv + (["--output", str(tmp_path / "run")] if argv[0] == "train" else []), capsys)
    assert code == 2 and message in err and out == ""
    assert not os.path.exists(tmp_path / "run")


def test_eval_json_into_a_missing_folder_fails_before_evaluating(tiny, tmp_path, capsys, monkeypatch):
    from convzoo.commands import eval as eval_command

    output = str(tmp_path / "run")
    assert run_cli(["train", "--model", tiny, "--output", output, "--epochs", "1"] + BUILTIN, capsys)[0] == 0
    monkeypatch.setattr(eval_command, "_dataset", lambda *a: pytest.fail("evaluation started"))
    code, _, err = run_cli(["eval", "--model", tiny, "--checkpoint", os.path.join(output, "checkpoint.pt"),
                         "--json", str(tmp_path / "nodir" / "x.json")], capsys)
    assert code == 2 and "nodir" in err and "does not exist" in err


def test_list_names_only_into_a_closed_pipe_exits_quietly(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    process = subprocess.Popen([sys.executable, "-m", "convzoo", "list", "--names-only"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the command writes (as `| head` can be)
    err = process.stderr.read()
    process.wait(timeout=120)
    assert process.returncode == 0, err.decode()
    assert b"BrokenPipeError" not in err and b"Traceback" not in err


def test_eval_of_an_official_file_uses_the_models_pretrained_cfg(tiny, tmp_path, capsys, monkeypatch):
    """A checkpoint that stores no input configuration (an official .pth) is evaluated with the
    model's registered pretrained_cfg: its resolution, normalisation, interpolation and crop."""
    from convzoo.train.data import ImageFolder, eval_transform, find_classes

    cfg = dict(input_size=(3, 20, 20), mean=(0.3, 0.4, 0.5), std=(0.2, 0.3, 0.25), crop_pct=1.0,
               interpolation="bilinear", crop_mode="squash")
    monkeypatch.setattr(tiny_model.tiny_test_net, "pretrained_cfg", cfg, raising=False)
    data = _image_folder(str(tmp_path / "data"))
    torch.manual_seed(3)
    model = tiny_model.tiny_test_net(num_classes=3).eval()
    path = str(tmp_path / "official.pth")
    torch.save({"model": model.state_dict()}, path)
    report = str(tmp_path / "report.json")
    code, out, err = run_cli(["eval", "--model", tiny, "--checkpoint", path, "--data", data, "--workers", "0",
                           "--json", report], capsys)
    assert code == 0, err
    assert f"resolution  20x20 ({tiny}'s pretrained_cfg)" in out
    # the same figures by hand, with that configuration's transform
    classes = find_classes(os.path.join(data, "train"))
    transform = eval_transform(20, 1.0, cfg["mean"], cfg["std"], "bilinear", "squash")
    images = ImageFolder(os.path.join(data, "val"), transform, {c: i for i, c in enumerate(classes)})
    x = torch.stack([images[i][0] for i in range(len(images))])
    labels = torch.tensor([images[i][1] for i in range(len(images))])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), labels).item()
    assert json.load(open(report))["loss"] == pytest.approx(loss, rel=1e-5)
