"""End-to-end tests of `convzoo train --task segmentation`, `convzoo eval --task segmentation`
and `convzoo predict`, run as a user runs them."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _cli import read_metrics, read_state, run_cli
from _seg_folders import make_generic
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RUN_UNTIL = os.path.join(HERE, "train", "run_until_step.py")

# a narrow model and a tiny built-in set: each run takes a second or two
MODEL = ["--task", "segmentation", "--model", "semfpn_replknet_tiny", "--model-arg", "channels=(8,8,8,8)",
         "--model-arg", "depths=(1,1,1,1)", "--model-arg", "head_channels=8", "--model-arg", "head_fpn_channels=8",
         "--threads", "1"]
BANDS = ["--data-arg", "height=16", "--data-arg", "width=32", "--data-arg", "min_band=8", "--data-arg", "max_band=8",
         "--train-size", "32", "--val-size", "8", "--batch-size", "8"]


def test_train_eval_predict_on_a_mask_folder(tmp_path, capsys):
    data = make_generic(tmp_path / "data", n=4, size=(40, 32))
    with open(os.path.join(data, "images", "train", "train3.png"), "wb") as handle:
        handle.write(b"\x89PNG broken")
    output = str(tmp_path / "run")
    code, out, err = run_cli(["train", "--data", data, "--image-size", "32", "--epochs", "2", "--batch-size", "2",
                           "--workers", "0", "--output", output, "--model-arg", "aux_channels=4"] + MODEL, capsys)
    assert code == 0, err
    records = read_metrics(output)
    assert [r["epoch"] for r in records] == [1, 2] and all(np.isfinite(r["val_miou"]) for r in records)
    assert "val mIoU" in err and "epoch 2/2 [####################]" in err and "val mIoU / aAcc" in out
    summary = json.load(open(os.path.join(output, "summary.json")))
    assert summary["task"] == "segmentation" and summary["skipped_train_images"] == 1
    assert "skipping unreadable image" in err and "train3.png" in err

    report = str(tmp_path / "eval.json")
    code, out, err = run_cli(["eval", "--model", "semfpn_replknet_tiny", "--checkpoint", os.path.join(output, "checkpoint.pt"),
                           "--data", data, "--json", report, "--threads", "1"], capsys)
    assert code == 0, err
    result = json.load(open(report))
    assert result["miou"] == pytest.approx(records[-1]["val_miou"]) and result["images"] == 4
    assert "mIoU" in out and "IoU (%)" in out and len(result["iou"]) == 3
    code, out, err = run_cli(["eval", "--model", "semfpn_replknet_tiny", "--checkpoint", os.path.join(output, "model.safetensors"),
                           "--task", "segmentation", "--data", data, "--image-size", "32", "--mode", "slide",
                           "--crop-size", "24", "--flip", "--threads", "1"], capsys)
    assert code == 0, err
    assert "slide inference + flip" in out

    blended, ids = str(tmp_path / "blend.png"), str(tmp_path / "ids.png")
    image = os.path.join(data, "images", "val", "val0.png")
    code, out, err = run_cli(["predict", "--model", "semfpn_replknet_tiny", "--checkpoint", os.path.join(output, "checkpoint.pt"),
                           "--image", image, "--out", blended, "--mask-out", ids, "--threads", "1"], capsys)
    assert code == 0, err
    assert Image.open(blended).size == (40, 32) and Image.open(blended).mode == "RGB"
    mask = np.asarray(Image.open(ids))
    assert mask.shape == (32, 40) and mask.max() < 3 and blended in out


@pytest.mark.parametrize("case,message", [
    ("no_mask", r"image\(s\) without a mask: .*train1\.png"),
    ("no_image", r"mask\(s\) without an image: .*val1\.png"),
    ("size", r"train0\.png is 8x8 but .*train0\.png is 20x16"),
    ("class_ids", r"class ids >= num_classes \(3\), up to 9.*train2\.png.*--num-classes 10"),
])
def test_bad_folders_stop_before_training_and_write_nothing(tmp_path, capsys, case, message):
    data = make_generic(tmp_path / "data")
    if case == "no_mask":
        os.remove(os.path.join(data, "masks", "train", "train1.png"))
    elif case == "no_image":
        os.remove(os.path.join(data, "images", "val", "val1.png"))
    elif case == "size":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.path.join(data, "masks", "train", "train0.png"))
    else:
        Image.fromarray(np.full((16, 20), 9, np.uint8)).save(os.path.join(data, "masks", "train", "train2.png"))
    output = str(tmp_path / "run")
    extra = ["--num-classes", "3"] if case == "class_ids" else []
    code, _, err = run_cli(["train", "--data", data, "--output", output] + extra + MODEL, capsys)
    assert code == 2
    assert __import__("re").search(message, err), err
    assert not os.path.exists(output)


def test_options_of_the_other_task_are_refused(capsys):
    assert run_cli(["train", "--num-classes", "3"], capsys)[0] == 2
    code, _, err = run_cli(["train", "--task", "segmentation", "--model", "replknet_tiny"], capsys)
    assert code == 2 and "upernet_<backbone> or semfpn_<backbone>" in err
    code, _, err = run_cli(["train", "--model", "semfpn_replknet_tiny"], capsys)
    assert code == 2 and "--task segmentation" in err


def test_kill_mid_epoch_then_resume_equals_a_straight_run(tmp_path, capsys):
    args = ["--epochs", "3", "--lr", "3e-3"] + MODEL + BANDS  # 4 steps per epoch
    killed, marker = str(tmp_path / "killed"), str(tmp_path / "marker")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + HERE}
    process = subprocess.Popen([sys.executable, RUN_UNTIL, marker, "6", "train", "--output", killed] + args,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not os.path.exists(marker) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(marker), process.stderr.read().decode()[-2000:] if process.poll() is not None else "timeout"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert open(marker).read() == "epoch 1 step 6\n"  # killed in the middle of the second epoch
    assert read_state(killed)["epoch"] == 1 and not os.path.exists(os.path.join(killed, "summary.json"))

    code, _, err = run_cli(["train", "--output", killed, "--resume"] + args, capsys)
    assert code == 0, err
    assert "after epoch 1" in err
    straight = str(tmp_path / "straight")
    assert run_cli(["train", "--output", straight] + args, capsys)[0] == 0
    a, b = read_state(straight), read_state(killed)
    assert a["step"] == b["step"] == 12 and a["meta"]["task"] == "segmentation"
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, param_state in a["optimizer"]["state"].items():
        assert torch.equal(param_state["exp_avg"], b["optimizer"]["state"][index]["exp_avg"])
    drop = ("train_seconds", "train_images_per_second")
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(straight)] == \
           [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(killed)]

    code, out, err = run_cli(["eval", "--model", "semfpn_replknet_tiny", "--checkpoint", os.path.join(killed, "checkpoint.pt"),
                           "--threads", "1"], capsys)
    assert code == 0, err
    assert f"{read_metrics(killed)[-1]['val_miou']:.2f}%" in out  # the built-in set is rebuilt from the checkpoint


def test_default_segmentation_run_is_the_demo_model_and_its_erf_is_drawn(tmp_path, capsys):
    output = str(tmp_path / "demo")
    tiny = BANDS[:-4] + ["--train-size", "16", "--val-size", "4", "--batch-size", "8"]
    code, out, err = run_cli(["train", "--task", "segmentation", "--epochs", "1", "--threads", "1", "--output", output] + tiny,
                          capsys)
    assert code == 0, err
    meta = read_state(output)["meta"]
    assert meta["model_name"] == "semfpn_replknet_tiny" and tuple(meta["model_args"]["kernel_sizes"]) == (31, 29, 27)
    assert meta["data"]["kind"] == "builtin-bands" and meta["data"]["width"] == 32
    figure = str(tmp_path / "erf.png")
    code, out, err = run_cli(["erf", "--model", "semfpn_replknet_tiny", "--checkpoint", os.path.join(output, "model.safetensors"),
                           "--builtin", "bands", "--input-size", "16,32", "--num-images", "2", "--out", figure,
                           "--label", "demo (31-29-27)"], capsys)
    assert code == 0, err
    assert Image.open(figure).size[0] > 0 and "| demo (31-29-27) | 2 |" in out
    assert run_cli(["erf", "--model", "semfpn_replknet_tiny", "--builtin", "bands", "--input-size", "8,32",
                 "--out", figure], capsys)[0] == 2


def test_two_process_gloo_run_validates_on_all_ranks(tmp_path, capsys):
    """torchrun with 2 CPU processes: ranks stay in sync, and the validation mIoU (each rank
    scores half the images, confusion matrices summed) equals a one-process evaluation."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    output = str(tmp_path / "ddp")
    env = {**os.environ, "PYTHONPATH": REPO, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    args = ["--epochs", "1", "--output", output] + MODEL + BANDS[:-2] + ["--batch-size", "4"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "convzoo", "train"] + args
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    record = read_metrics(output)[-1]
    assert record["ranks_in_sync"] and record["step"] == 32 // 8
    code, out, err = run_cli(["eval", "--model", "semfpn_replknet_tiny", "--checkpoint", os.path.join(output, "checkpoint.pt"),
                           "--json", str(tmp_path / "e.json"), "--threads", "1"], capsys)
    assert code == 0, err
    assert json.load(open(tmp_path / "e.json"))["miou"] == pytest.approx(record["val_miou"])
