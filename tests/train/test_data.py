import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from convzoo.train.data import (
    SHAPES,
    DataError,
    EpochSampler,
    ImageFolder,
    MixConfig,
    RandAugmentLite,
    RandomResizedCrop,
    RelationConfig,
    RelationDataset,
    ResizeCenterCrop,
    ToNormalizedTensor,
    collate,
    eval_transform,
    image_folder_splits,
    mix_batch,
    one_hot_smoothed,
    train_transform,
)


# ---------------------------------------------------------------- built-in relation data set

def test_relation_samples_are_deterministic_and_distinct():
    config = RelationConfig(image_size=32, num_train=16, num_val=8, seed=3)
    a, b = RelationDataset("train", config), RelationDataset("train", config)
    image, label, skipped = a[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and skipped == ()
    assert 0 <= label < 4
    assert torch.equal(image, b[5][0]) and label == b[5][1]
    assert not torch.equal(image, a[6][0])
    assert not torch.equal(image, RelationDataset("val", config)[5][0])
    assert not torch.equal(image, RelationDataset("train", RelationConfig(image_size=32, seed=4))[5][0])
    # training pictures are new in every epoch (sampler key (index, (seed, epoch))), unless asked otherwise
    assert torch.equal(a[(5, (0, 7))][0], a[(5, (0, 7))][0])
    assert not torch.equal(a[(5, (0, 7))][0], a[(5, (0, 8))][0])
    fixed = RelationDataset("train", RelationConfig(image_size=32, seed=3, fresh_train=False))
    assert torch.equal(fixed[(5, (0, 7))][0], fixed[(5, (0, 8))][0])
    val = RelationDataset("val", config)
    assert torch.equal(val[(5, (0, 7))][0], val[5][0])


def _read_mark(part):
    """(shape, colour) of the single 5x5 mark drawn on a noise-free (3, H, W) part."""
    ink = (part.abs().sum(0) > 0).numpy()
    height, width = ink.shape
    for shape, mask in enumerate(SHAPES):
        for y in range(height - 4):
            for x in range(width - 4):
                placed = np.zeros_like(ink)
                placed[y:y + 5, x:x + 5] = mask > 0
                if np.array_equal(placed, ink):
                    return shape, int(part[:, y:y + 5, x:x + 5].sum((1, 2)).argmax()), y
    raise AssertionError("no mark found")


@pytest.mark.parametrize("relation", ["height", "colour", "shape", "shape+colour"])
def test_relation_labels_follow_the_two_key_marks(relation):
    # Without noise and distractors the two marks can be read back from the image itself.
    config = RelationConfig(image_size=32, num_train=40, noise=0.0, num_distractors=0, relation=relation)
    dataset = RelationDataset("train", config)
    labels = set()
    for index in range(len(dataset)):
        image, label, _ = dataset[index]
        (shape_a, colour_a, y_a), (shape_b, colour_b, y_b) = _read_mark(image[:, :, :8]), _read_mark(image[:, :, -8:])
        if relation == "height" and y_a != y_b:
            assert min(abs(y_a - y_b), 28 - abs(y_a - y_b)) >= 7  # 28 rows fit a 5-row mark in 32
        expected = {"height": int(y_a != y_b), "colour": int(colour_a != colour_b), "shape": int(shape_a != shape_b),
                    "shape+colour": 2 * (shape_a != shape_b) + (colour_a != colour_b)}[relation]
        assert label == expected
        labels.add(label)
    assert labels == set(range(dataset.num_classes))


def test_relation_fixed_places_moves_only_the_key_marks():
    # Same shapes, colours, sides and labels as the default set, the marks at the middle row of
    # their quarters (x = 1 and 25 in 32 px), so the colour relation needs no position invariance.
    moving = RelationDataset("train", RelationConfig(image_size=32, num_train=30, noise=0.0, relation="colour"))
    fixed = RelationDataset("train", RelationConfig(image_size=32, num_train=30, noise=0.0, relation="colour",
                                                    fixed_places=True))
    for index in range(len(fixed)):
        image, label, _ = fixed[index]
        assert label == moving[index][1]
        marks = [_read_mark(image[:, :, :8]), _read_mark(image[:, :, -8:])]
        assert [m[2] for m in marks] == [13, 13]
        assert [m[:2] for m in marks] == [_read_mark(moving[index][0][:, :, :8])[:2], _read_mark(moving[index][0][:, :, -8:])[:2]]
        assert (image[:, :, 1:6].abs().sum() > 0) and (image[:, :, 25:30].abs().sum() > 0)
        assert image[:, :, :1].abs().sum() == 0 and image[:, :, 6:25].abs().sum() == 0


@pytest.mark.parametrize("relation", ["height", "shape+colour"])
def test_relation_class_means_carry_no_label_information(relation):
    # The average image of each class is the same: no pixel position or colour tells the class.
    config = RelationConfig(image_size=32, num_train=4000, noise=0.0, relation=relation)
    dataset = RelationDataset("train", config)
    k = dataset.num_classes
    sums, counts = torch.zeros(k, 3, 32, 32), torch.zeros(k)
    for index in range(len(dataset)):
        image, label, _ = dataset[index]
        sums[label] += image
        counts[label] += 1
    means = sums / counts.view(k, 1, 1, 1)
    spread = (means - means.mean(0)).abs().mean()
    assert counts.min() > 0.8 * len(dataset) / k
    assert spread < 0.01 * config.amplitude


@pytest.mark.parametrize("make, message", [
    pytest.param(lambda: RelationConfig(image_size=8), "image_size", id="image-size"),
    pytest.param(lambda: RelationConfig(num_shapes=9), "num_shapes", id="num-shapes"),
    pytest.param(lambda: RelationConfig(relation="size"), "relation must be one of height, colour, shape, shape\\+colour",
                 id="relation"),
    pytest.param(lambda: RelationDataset("test"), "split", id="split"),
    pytest.param(lambda: RelationConfig(fixed_places=True), "fixed_places=True .* 'height' relation", id="fixed-height"),
])
def test_relation_config_rejects_bad_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---------------------------------------------------------------- transforms

def _picture(width=40, height=30, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_random_resized_crop_size_and_determinism():
    crop = RandomResizedCrop(16, scale=(0.2, 1.0))
    image = _picture()
    a = np.asarray(crop(image, np.random.default_rng(1)))
    b = np.asarray(crop(image, np.random.default_rng(1)))
    assert a.shape == (16, 16, 3) and np.array_equal(a, b)
    left, top, right, bottom = crop.box(40, 30, np.random.default_rng(2))
    assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30


def test_resize_center_crop_and_normalisation():
    picture = _picture(50, 20)
    out = ResizeCenterCrop(16)(picture)
    assert out.size == (16, 16)
    # the centre crop of the bicubic resize to short side 16 / 0.875 = 18 (45 x 18)
    expected = picture.resize((45, 18), Image.BICUBIC).crop((14, 1, 30, 17))
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    squashed = ResizeCenterCrop(16, 1.0, "bilinear", "squash")(picture)  # the whole image, warped
    assert np.array_equal(np.asarray(squashed), np.asarray(picture.resize((16, 16), Image.BILINEAR)))
    with pytest.raises(ValueError, match="crop_mode"):
        ResizeCenterCrop(16, crop_mode="corner")
    white = Image.new("RGB", (4, 4), (255, 255, 255))
    tensor = ToNormalizedTensor(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(white)
    assert tensor.shape == (3, 4, 4) and torch.allclose(tensor, torch.full((3, 4, 4), 2.0))


def test_randaugment_keeps_size_and_is_deterministic():
    augment = RandAugmentLite(num_ops=3, magnitude=9)
    image = _picture()
    for seed in range(6):
        a, b = augment(image, np.random.default_rng(seed)), augment(image, np.random.default_rng(seed))
        assert a.size == image.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_pipelines_produce_normalised_tensors():
    image = _picture()
    x = train_transform(24, randaugment=(2, 5))(image, np.random.default_rng(0))
    y = eval_transform(24)(image, None)
    assert x.shape == y.shape == (3, 24, 24) and x.dtype == torch.float32


# ---------------------------------------------------------------- image folders

def _write_image(path, seed=0, fmt=None, size=(20, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _picture(*size, seed=seed).save(path, format=fmt)


def _make_folder(root, classes=("cat", "dog"), per_class=3):
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            for i in range(per_class):
                ext = (".jpg", ".png", ".webp")[i % 3]
                _write_image(os.path.join(root, split, name, f"{i}{ext}"), seed=10 * c + i)


def test_image_folder_reads_jpeg_png_webp(tmp_path):
    _make_folder(tmp_path)
    train, val = image_folder_splits(str(tmp_path), 16)
    assert train.classes == ["cat", "dog"] and len(train) == 6 and len(val) == 6
    image, label, skipped = train[(4, (0, 0))]
    assert image.shape == (3, 16, 16) and label == 1 and skipped == ()


def test_unreadable_images_are_skipped_and_reported(tmp_path, caplog):
    _make_folder(tmp_path, per_class=2)
    bad_jpeg = tmp_path / "train" / "cat" / "0_corrupt.jpg"
    bad_jpeg.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    buffer = io.BytesIO()
    _picture(64, 64).save(buffer, format="PNG")
    truncated = tmp_path / "val" / "dog" / "0_truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    train, val = image_folder_splits(str(tmp_path), 16)
    index = [p for p, _ in train.samples].index(str(bad_jpeg))
    image, label, skipped = train[index]
    assert image.shape == (3, 16, 16) and skipped == (str(bad_jpeg),) and label == 0  # the next image instead
    index = [p for p, _ in val.samples].index(str(truncated))
    image, label, skipped = val[index]
    assert image is None and skipped == (str(truncated),)
    batch = collate([val[i] for i in range(len(val))])
    assert batch[0].shape[0] == len(val) - 1 and batch[2] == (str(truncated),)
    assert "skipping unreadable image" in caplog.text


def test_empty_class_folder_is_an_error(tmp_path):
    _make_folder(tmp_path)
    os.makedirs(tmp_path / "train" / "bird")
    with pytest.raises(DataError, match=r"train/bird holds no images"):
        image_folder_splits(str(tmp_path), 16)


def test_unknown_val_class_is_an_error(tmp_path):
    _make_folder(tmp_path)
    _write_image(str(tmp_path / "val" / "horse" / "a.png"))
    with pytest.raises(DataError, match="classes the training split does not have: horse"):
        image_folder_splits(str(tmp_path), 16)


def test_missing_folders_are_errors(tmp_path):
    with pytest.raises(DataError, match="data folder not found: .*nowhere"):
        image_folder_splits(str(tmp_path / "nowhere"), 16)
    os.makedirs(tmp_path / "train" / "a")
    with pytest.raises(DataError, match="no 'val' folder"):
        image_folder_splits(str(tmp_path), 16)
    with pytest.raises(ValueError, match="skip_policy"):
        ImageFolder(str(tmp_path / "train"), None, skip_policy="retry")


def test_a_folder_of_only_unreadable_images_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"garbage")
    dataset = ImageFolder(str(tmp_path), eval_transform(8))
    with pytest.raises(DataError, match="none of the 1 images"):
        dataset[0]


# ---------------------------------------------------------------- sampling and mixing

def test_epoch_sampler_shards_form_the_single_process_batches():
    single = list(EpochSampler(23, seed=5, drop_last=True))
    shards = [list(EpochSampler(23, seed=5, rank=r, world_size=2, drop_last=True)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 11
    batch = 3  # per rank; the single process uses 2 * batch
    for k in range(len(shards[0]) // batch):
        together = sorted(shards[0][k * batch:(k + 1) * batch] + shards[1][k * batch:(k + 1) * batch])
        assert together == sorted(single[k * 2 * batch:(k + 1) * 2 * batch])


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(50, seed=1)
    sampler.set_epoch(2)
    first = list(sampler)
    assert first == list(sampler)
    assert all(key == (1, 2) for _, key in first) and sorted(i for i, _ in first) == list(range(50))
    sampler.set_epoch(3)
    assert [i for i, _ in list(sampler)] != [i for i, _ in first]
    unshuffled = EpochSampler(7, shuffle=False, rank=1, world_size=2)
    assert [i for i, _ in unshuffled] == [1, 3, 5] and len(unshuffled) == 3


def test_one_hot_smoothed_sums_to_one():
    target = one_hot_smoothed(torch.tensor([0, 2]), 4, 0.1)
    assert torch.allclose(target.sum(1), torch.ones(2))
    assert target[0, 0] == pytest.approx(0.925) and target[0, 1] == pytest.approx(0.025)


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0)], ids=["mixup", "cutmix"])
def test_mix_batch_mixes_images_and_targets_alike(mixup, cutmix):
    images = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    targets = one_hot_smoothed(torch.tensor([0, 1]), 2, 0.0)
    mixed, mixed_targets = mix_batch(images, targets, MixConfig(mixup, cutmix), np.random.default_rng(4))
    assert torch.allclose(mixed_targets.sum(1), torch.ones(2))
    # the share of image 1 in mixed image 0 equals the weight of class 1 in its target
    assert mixed[0].mean().item() == pytest.approx(mixed_targets[0, 1].item(), abs=1e-6)
    same, same_targets = mix_batch(images, targets, MixConfig(), np.random.default_rng(4))
    assert same is images and same_targets is targets
