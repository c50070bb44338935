"""The built-in band data set's rules, the mask-folder readers (and each bad input), joint transforms."""
import os

import numpy as np
import pytest
import torch
from _seg_folders import make_ade, make_generic, write_pair
from PIL import Image

from convzoo.train.data import COLOURS, DataError
from convzoo.train.segdata import (IGNORE_INDEX, BandsConfig, BandsDataset, SegEvalTransform, SegTrainTransform,
                                   pair_images_and_masks, read_mask, seg_collate, segmentation_folder_splits)

SMALL = BandsConfig(height=32, width=64, num_train=64, num_val=64)


# ---------------------------------------------------------------- the built-in band data set

def _labels_from_clean_image(image, cfg):
    """Re-derive the mask from a noise-free image alone: lines are the rows lifted by
    line_amplitude everywhere; a band's class is the colour of the marker inside it."""
    lifted = np.isclose(image, cfg.line_amplitude).all(axis=(0, 2))
    lines = np.flatnonzero(lifted)
    mask = np.full(image.shape[1:], IGNORE_INDEX)
    edges = [-1, *lines, cfg.height]
    for top, bottom in zip(edges[:-1], edges[1:]):
        band = image[:, top + 1:bottom]
        ink = np.abs(band).sum(0) > 0
        if not ink.any():
            continue
        ys, xs = np.nonzero(ink)
        colour = band[:, ys[0], xs[0]] / cfg.amplitude
        cls = int(np.argmin(np.abs(COLOURS[: cfg.num_colours] - colour).sum(1)))
        mask[top + 1:bottom] = cls
        y0, x0 = ys.min() + top + 1, xs.min() - 1  # the plus's top pixel is at column x + 2: box from x - m
        box_top, box_left = y0, int(np.round(xs.mean())) - 2
        m = cfg.ignore_margin
        mask[max(0, box_top - m):box_top + 5 + m, max(0, box_left - m):box_left + 5 + m] = IGNORE_INDEX
    mask[lines] = IGNORE_INDEX
    return mask


def test_label_rules_read_back_from_noise_free_images():
    data = BandsDataset("val", SMALL)
    for index in range(40):
        layout = data.layout(index)
        image, mask = data.render(layout)
        np.testing.assert_array_equal(_labels_from_clean_image(image, SMALL), mask)
        gaps = np.diff(layout.lines)
        assert ((gaps >= SMALL.min_band) & (gaps <= SMALL.max_band)).all()


def test_samples_are_deterministic_by_seed_and_fresh_per_epoch():
    train = BandsDataset("train", SMALL)
    a, b = train[(3, (0, 0))], train[(3, (0, 0))]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], train[(3, (0, 1))][0])
    other_seed = BandsDataset("train", BandsConfig(**{**SMALL.__dict__, "seed": 1}))
    assert not torch.equal(a[0], other_seed[(3, (0, 0))][0])
    val = BandsDataset("val", SMALL)
    assert torch.equal(val[(5, (0, 0))][0], val[(5, (0, 7))][0])  # validation images never change


def _patches(images, masks, radius):
    """(P, 3 * (2r+1)^2) patches around every labelled pixel and their (P,) labels."""
    x = torch.nn.functional.pad(torch.as_tensor(images), (radius,) * 4)
    cols = torch.nn.functional.unfold(x, 2 * radius + 1)  # (N, C*k*k, H*W)
    feats = cols.permute(0, 2, 1).reshape(-1, cols.shape[1])
    labels = torch.as_tensor(masks).reshape(-1)
    keep = labels != IGNORE_INDEX
    return feats[keep], labels[keep]


def _dataset_arrays(split, n, cfg):
    data = BandsDataset(split, cfg)
    pairs = [data.sample(i) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


@pytest.fixture(scope="module")
def patches():
    cfg = BandsConfig(height=32, width=64, num_train=100, num_val=100)
    return _dataset_arrays("train", 100, cfg), _dataset_arrays("val", 100, cfg)


def test_every_class_has_the_same_mean_patch(patches):
    (images, masks), _ = patches
    feats, labels = _patches(images, masks, 1)
    means = torch.stack([feats[labels == k].mean(0) for k in range(3)])
    assert (labels.bincount() > 10000).all()
    # per-feature noise std ~0.3-1 over >10k strongly correlated pixels: class means differ by < 0.03
    assert (means - means.mean(0)).abs().max() < 0.03


def _local_accuracy(train, val, radius):
    """Validation accuracy of a linear + quadratic read-out of each labelled pixel's patch."""
    x, y = _patches(*train, radius)
    xv, yv = _patches(*val, radius)
    torch.manual_seed(0)
    expand = lambda f: torch.cat([f, f * f], 1)  # noqa: E731
    classifier = torch.nn.Linear(expand(x).shape[1], 3)
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=30)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(classifier(expand(x)), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    accuracy = (classifier(expand(xv)).argmax(1) == yv).float().mean().item()
    return accuracy, yv.bincount(minlength=3).max().item() / len(yv)


@pytest.mark.parametrize("radius", [0, 1], ids=["1x1", "3x3"])
def test_a_local_classifier_stays_at_chance(patches, radius):
    accuracy, majority = _local_accuracy(*patches, radius)
    assert accuracy < max(majority, 1 / 3) + 0.02


def test_the_local_classifier_finds_a_weak_leak(patches):
    """Control: tint each labelled pixel by 0.1 x its class colour (a third of the noise): found."""
    def leak(images, masks):
        tint = COLOURS[np.where(masks == IGNORE_INDEX, 0, masks)].transpose(0, 3, 1, 2) * (masks != IGNORE_INDEX)[:, None]
        return images + 0.1 * tint.astype(np.float32), masks

    accuracy, majority = _local_accuracy(leak(*patches[0]), leak(*patches[1]), 0)
    assert accuracy > max(majority, 1 / 3) + 0.1


def test_bands_config_rejects_bad_values():
    with pytest.raises(ValueError, match="min_band"):
        BandsConfig(min_band=4)
    with pytest.raises(ValueError, match="num_colours"):
        BandsConfig(num_colours=7)


# ---------------------------------------------------------------- mask folders

def test_generic_layout_pairs_by_stem_and_infers_the_classes(tmp_path):
    root = make_generic(tmp_path)
    splits = segmentation_folder_splits(root, 16)
    assert splits["train"].num_classes == 3 and len(splits["train"]) == 3 and len(splits["val"]) == 3
    image, mask, skipped = splits["train"][(0, (0, 0))]
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16) and skipped == ()
    image, mask, _ = splits["val"][0]
    assert image.shape[-2:] == mask.shape and min(mask.shape) == 16


def test_ade20k_layout_with_reduce_zero_label(tmp_path):
    root = make_ade(tmp_path)
    plain = segmentation_folder_splits(root, 16)
    assert plain["train"].num_classes == 4
    reduced = segmentation_folder_splits(root, 16, reduce_zero_label=True)
    assert reduced["train"].num_classes == 3
    path = reduced["train"].pairs[0][1]
    raw, ids = read_mask(path), read_mask(path, reduce_zero_label=True)
    np.testing.assert_array_equal(ids, np.where(raw == 0, IGNORE_INDEX, raw - 1))


def test_image_without_mask_is_named(tmp_path):
    root = make_generic(tmp_path)
    os.remove(os.path.join(root, "masks", "train", "train1.png"))
    with pytest.raises(DataError, match=r"image\(s\) without a mask: .*train1\.png; add .*masks/train"):
        segmentation_folder_splits(root, 16)


def test_mask_without_image_is_named(tmp_path):
    root = make_generic(tmp_path)
    os.remove(os.path.join(root, "images", "val", "val2.png"))
    with pytest.raises(DataError, match=r"mask\(s\) without an image: .*val2\.png"):
        segmentation_folder_splits(root, 16)


def test_mask_of_another_size_is_named(tmp_path):
    root = make_generic(tmp_path)
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(os.path.join(root, "masks", "train", "train0.png"))
    with pytest.raises(DataError, match=r"train0\.png is 7x5 but .*train0\.png is 20x16.*resize"):
        segmentation_folder_splits(root, 16)


def test_class_ids_beyond_num_classes_are_counted(tmp_path):
    root = make_generic(tmp_path)
    mask = np.zeros((16, 20), np.uint8)
    mask[:2, :3] = 7
    mask[5, 5] = IGNORE_INDEX  # the ignore index is fine
    Image.fromarray(mask).save(os.path.join(root, "masks", "val", "val0.png"))
    with pytest.raises(DataError, match=r"6 pixel\(s\) in 1 mask\(s\) have class ids >= num_classes \(3\), up to 7.*val0\.png"
                                        r".*--num-classes 8"):
        segmentation_folder_splits(root, 16)
    assert segmentation_folder_splits(root, 16, num_classes=8)["val"].num_classes == 8


def test_unreadable_files_are_skipped_and_counted(tmp_path, caplog):
    root = make_generic(tmp_path)
    with open(os.path.join(root, "images", "train", "train2.png"), "wb") as handle:
        handle.write(b"not a png")
    splits = segmentation_folder_splits(root, 16)
    assert len(splits["train"]) == 2 and len(splits["train"].unreadable) == 1
    assert "skipping unreadable image" in caplog.text and "train2.png" in caplog.text


def test_no_layout_names_both(tmp_path):
    with pytest.raises(DataError, match="images/training.*annotations/training.*masks/train"):
        segmentation_folder_splits(str(tmp_path), 16)


def test_pairing_refuses_two_images_of_one_stem(tmp_path):
    root = make_generic(tmp_path)
    write_pair(root, "images/train", "masks/train", "train0", image_ext=".jpg")
    with pytest.raises(DataError, match="same name stem"):
        pair_images_and_masks(os.path.join(root, "images/train"), os.path.join(root, "masks/train"))


# ---------------------------------------------------------------- joint transforms and batching

def test_train_transform_keeps_image_and_mask_aligned():
    """A mask that equals the image's red channel quantised stays a subset of the ids and
    matches the transformed image where the colour is unambiguous (nearest-neighbour masks)."""
    ids = np.repeat(np.repeat(np.arange(4, dtype=np.int64).reshape(2, 2), 20, 0), 30, 1)  # 40x60 quadrants
    image = Image.fromarray(np.stack([(ids * 60).astype(np.uint8)] * 3, -1))
    transform = SegTrainTransform(32, photometric=False)
    for seed in range(10):
        x, y = transform(image, ids, np.random.default_rng(seed))
        assert x.shape == (3, 32, 32) and y.shape == (32, 32)
        valid = y != IGNORE_INDEX
        assert set(y[valid].unique().tolist()) <= {0, 1, 2, 3}
        red = (x[0] * 0.229 + 0.485) * 255
        inside = valid & (red - y * 60).abs().lt(1.0)
        assert inside.float().sum() > 0.8 * valid.float().sum()
    x, y = SegEvalTransform(20)(image, ids)
    assert y.shape == (20, 30) and x.shape == (3, 20, 30) and set(y.unique().tolist()) == {0, 1, 2, 3}


def test_collate_pads_to_the_largest_with_ignore():
    batch = [(torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.long), ()),
             (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.long), ("bad.png",)),
             (None, None, ("worse.png",))]
    images, masks, skipped = seg_collate(batch)
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5) and skipped == ("bad.png", "worse.png")
    assert (masks[0, 4:] == IGNORE_INDEX).all() and (images[0, :, 4:] == 0).all() and (masks[1, :, 3:] == IGNORE_INDEX).all()
