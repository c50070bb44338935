import math
import os

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from convzoo.train.data import EpochSampler, RelationConfig, RelationDataset, collate
from convzoo.train.loop import (
    ModelEma,
    TrainConfig,
    atomic_torch_save,
    cosine_lr,
    evaluate,
    load_training_checkpoint,
    param_groups,
)


def test_cosine_lr_warms_up_then_decays_to_the_floor():
    lrs = [cosine_lr(step, 100, 10, 1.0, 0.01) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert cosine_lr(100, 100, 10, 1.0, 0.01) == pytest.approx(0.01)
    assert cosine_lr(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine_lr(0, 10, 0, 2.0, 0.0) == pytest.approx(2.0)


def test_param_groups_exempt_norms_and_biases_from_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2, 4} and {p.ndim for p in no_decay["params"]} == {1}


def test_model_ema_follows_the_polyak_average():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ModelEma(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # warm-up decay min(0.5, 2/11)
    expected = 1.0 - 2 / 11
    assert torch.allclose(ema.module.weight, torch.full((1, 2), expected))
    clone = ModelEma(nn.Linear(2, 1, bias=False), decay=0.5)
    clone.load_state_dict(ema.state_dict())
    assert clone.updates == 1 and torch.equal(clone.module.weight, ema.module.weight)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


def test_atomic_save_replaces_only_complete_files(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    atomic_torch_save({"format": "convzoo-train", "epoch": 1}, path)
    atomic_torch_save({"format": "convzoo-train", "epoch": 2}, path)
    assert load_training_checkpoint(path)["epoch"] == 2
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    torch.save({"state_dict": {}}, str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="not a convzoo training checkpoint"):
        load_training_checkpoint(str(tmp_path / "other.pt"))


class _Oracle(nn.Module):
    """Logits that put the true label of the relation data set first, computed from a lookup."""

    def __init__(self, labels):
        super().__init__()
        self.labels = labels
        self.calls = 0

    def forward(self, x):
        labels = self.labels[self.calls: self.calls + x.shape[0]]
        self.calls += x.shape[0]
        logits = torch.zeros(x.shape[0], 4)
        logits[torch.arange(x.shape[0]), labels] = 2.0
        logits[torch.arange(x.shape[0]), (labels + 1) % 4] = 1.0
        return logits


def test_evaluate_counts_top1_top5_and_loss():
    dataset = RelationDataset("val", RelationConfig(image_size=24, num_val=10))
    labels = torch.tensor([dataset.sample(i)[1] for i in range(10)])
    loader = DataLoader(dataset, batch_size=4, sampler=EpochSampler(10, shuffle=False), collate_fn=collate)
    result = evaluate(_Oracle(labels), loader, torch.device("cpu"))
    assert result.top1 == 100.0 and result.top5 == 100.0 and result.num_images == 10
    expected_loss = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 2))
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)
    wrong = _Oracle((labels + 1) % 4)
    result = evaluate(wrong, loader, torch.device("cpu"))
    assert result.top1 == 0.0 and result.top5 == 100.0


def test_sync_bn_on_cpu_is_refused_before_any_process_group_is_needed():
    from convzoo.train.distributed import DistInfo, wrap_model

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert wrap_model(model, DistInfo()) is model  # one process: nothing to wrap
    with pytest.raises(ValueError, match="--sync-bn needs GPUs"):
        wrap_model(model, DistInfo(rank=0, world_size=2), sync_bn=True)


def _bn_net(momentum):
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                         nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_recalibrate_batchnorm_averages_the_batch_statistics_of_the_current_weights():
    from convzoo.train.loop import recalibrate_batchnorm

    torch.manual_seed(0)
    model = _bn_net(momentum=0.01).eval()
    batches = [torch.randn(5, 3, 6, 6) * 2 + 1 for _ in range(3)]
    assert recalibrate_batchnorm(model, batches) == 1
    conv, norm = model[0], model[1]
    with torch.no_grad():
        outs = [conv(b).transpose(0, 1).flatten(1) for b in batches]  # (C, N*H*W) per batch
    torch.testing.assert_close(norm.running_mean, torch.stack([o.mean(1) for o in outs]).mean(0))
    torch.testing.assert_close(norm.running_var, torch.stack([o.var(1) for o in outs]).mean(0))
    assert norm.momentum == 0.01 and not model.training and not norm.training  # modes and momentum restored
    assert recalibrate_batchnorm(nn.Linear(2, 2), batches) == 0


def test_trainer_bn_recalibrate_refreshes_the_running_statistics_before_validation():
    from convzoo.train.loop import Trainer

    cfg = RelationConfig(image_size=24, num_train=16, num_val=4)
    train, val = RelationDataset("train", cfg), RelationDataset("val", cfg)
    runs = {}
    for batches in (0, 2):
        torch.manual_seed(0)
        trainer = Trainer(_bn_net(momentum=0.01), train, val, 2, TrainConfig(epochs=1, batch_size=8, bn_recalibrate=batches))
        trainer.fit()
        runs[batches] = trainer.model[1].running_var.clone()
    with torch.no_grad():  # the same two batches through the final conv of the recalibrated run
        trainer.train_sampler.set_epoch(0)
        outs = [trainer.model[0](images).transpose(0, 1).flatten(1) for images, _, _ in trainer.train_loader]
    torch.testing.assert_close(runs[2], torch.stack([o.var(1) for o in outs]).mean(0))
    assert not torch.allclose(runs[0], runs[2], rtol=0.1)  # momentum 0.01 left them near their start
    with pytest.raises(ValueError, match="bn_recalibrate"):
        TrainConfig(bn_recalibrate=-1)
