"""Tiny mask folders written by the segmentation tests (importable: tests/conftest.py puts this
folder on sys.path)."""
import os

import numpy as np
from PIL import Image


def write_pair(root, split_images, split_masks, stem, size=(20, 16), ids=(0, 1, 2), image_ext=".png"):
    os.makedirs(os.path.join(root, split_images), exist_ok=True)
    os.makedirs(os.path.join(root, split_masks), exist_ok=True)
    rng = np.random.default_rng(len(stem))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(os.path.join(root, split_images, stem + image_ext))
    mask = np.array(ids, np.uint8)[rng.integers(len(ids), size=(size[1], size[0]))]
    Image.fromarray(mask).save(os.path.join(root, split_masks, stem + ".png"))


def make_generic(root, n=3, **kwargs):
    for split in ("train", "val"):
        for i in range(n):
            write_pair(root, f"images/{split}", f"masks/{split}", f"{split}{i}", **kwargs)
    return str(root)


def make_ade(root, n=2):
    for split in ("training", "validation"):
        for i in range(n):
            write_pair(root, f"images/{split}", f"annotations/{split}", f"ADE_{split}_{i}", ids=(0, 1, 2, 3), image_ext=".jpg")
    return str(root)
