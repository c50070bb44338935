"""Data for training and evaluation: the built-in relation data set, image folders, transforms.

Every sample is addressed by a *key*: an ``int`` index, or an ``(index, aug_key)`` pair where
``aug_key`` is a tuple of ints (seed, epoch) from :class:`EpochSampler`. All randomness of a
sample (augmentation, or the picture itself for the built-in set) comes from a generator
seeded with ``(*aug_key, index)``, so an epoch's data is a function of seed and epoch alone:
independent of the number of loader workers, of the number of processes, and of whether
training was interrupted and resumed.

Images come out normalised, float32, (3, H, W); a batch from :func:`collate` is
``(images (N, 3, H, W), labels (N,), skipped_paths tuple)``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..models._builder import IMAGENET_MEAN, IMAGENET_STD  # re-exported: the normalisation of image folders

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")



class DataError(ValueError):
    """A data set that cannot be used as given (missing folder, empty class, unknown classes)."""


def _split_key(key) -> Tuple[int, Tuple[int, ...]]:
    if isinstance(key, tuple):
        index, aug_key = key
        return int(index), tuple(aug_key)
    return int(key), ()


def _rng(aug_key: Tuple[int, ...], index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([stream, *aug_key, index])


# --------------------------------------------------------------------------------------------
# The built-in data set: classes defined by the relation between two far-apart marks
# --------------------------------------------------------------------------------------------

def _mask(rows: Sequence[str]) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows], dtype=np.float32)


# Five 5x5 shapes with exactly nine pixels each, so that the amount of "ink" in an image says
# nothing about which shapes it holds.
SHAPES = np.stack([
    _mask(["..#..", "..#..", "#####", "..#..", "..#.."]),  # plus
    _mask(["#...#", ".#.#.", "..#..", ".#.#.", "#...#"]),  # cross
    _mask([".....", ".###.", ".###.", ".###.", "....."]),  # block
    _mask(["#....", "#....", "#....", "#....", "#####"]),  # corner
    _mask(["#####", "..#..", "..#..", "..#..", "..#.."]),  # tee
])
# Colours of equal brightness (sum of channels), in units of the noise-free mark amplitude.
COLOURS = np.array([
    [1.0, -0.5, -0.5],
    [-0.5, 1.0, -0.5],
    [-0.5, -0.5, 1.0],
], dtype=np.float32)

# The classes of each relation the built-in data set can ask about.
RELATION_CLASSES = {
    "height": ("same height", "other height"),
    "colour": ("same colour", "other colour"),
    "shape": ("same shape", "other shape"),
    "shape+colour": ("same shape, same colour", "same shape, other colour",
                     "other shape, same colour", "other shape, other colour"),
}




@dataclasses.dataclass(frozen=True)
class RelationConfig:
    """Parameters of the built-in data set (see :class:`RelationDataset`)."""

    image_size: int = 32
    num_train: int = 8192
    num_val: int = 2048
    num_shapes: int = 4
    num_colours: int = 2
    num_distractors: int = 0
    noise: float = 0.3
    amplitude: float = 2.0
    fresh_train: bool = True
    relation: str = "height"
    seed: int = 0
    fixed_places: bool = False

    def __post_init__(self):
        if self.image_size < 24:
            raise ValueError(f"image_size must be >= 24 for the built-in data set, got {self.image_size}")
        if not 2 <= self.num_shapes <= len(SHAPES):
            raise ValueError(f"num_shapes must be in [2, {len(SHAPES)}], got {self.num_shapes}")
        if not 2 <= self.num_colours <= len(COLOURS):
            raise ValueError(f"num_colours must be in [2, {len(COLOURS)}], got {self.num_colours}")
        if self.relation not in RELATION_CLASSES:
            raise ValueError(f"relation must be one of {', '.join(RELATION_CLASSES)}, got {self.relation!r}")
        if self.fixed_places and self.relation == "height":
            raise ValueError("fixed_places=True puts both key marks on the same row, so the 'height' relation has "
                             "one class only: use relation 'colour', 'shape' or 'shape+colour' with it")
        if self.num_train < 1 or self.num_val < 1 or self.num_distractors < 0:
            raise ValueError("num_train and num_val must be >= 1 and num_distractors >= 0")


class RelationDataset(Dataset):
    """Noisy images whose class is the relation between two marks at opposite sides.

    Each (3, S, S) image holds Gaussian noise, one *key* mark in its left quarter, one in its
    right quarter (at independent heights, so at least S/2 apart), and ``num_distractors``
    marks of the same shapes and colours scattered over the middle half (a distractor may
    overlap another). A mark is one of
    ``num_shapes`` 5x5 shapes of nine pixels drawn in one of ``num_colours`` colours of equal
    brightness. The class (:data:`RELATION_CLASSES` of ``config.relation``) says whether the two
    key marks sit at the same height (``"height"``, the default: the same row, or rows at least
    a quarter of the image apart, counted cyclically so that each mark's row stays uniform), have the same colour
    (``"colour"``), the same shape (``"shape"``) or both (``"shape+colour"``, 4 classes).

    Each mark on its own is uniformly distributed over shapes and colours in every class, and
    distractors are drawn from the same distribution, so no local patch carries information
    about the label: a model has to relate the two sides of the image. Samples are generated
    on the fly from ``(seed, split, index)``, and with ``fresh_train`` (the default) training
    images also from the epoch, so every epoch sees new pictures (an endless supply, nothing
    to memorise); nothing is stored or downloaded.

    ``fixed_places`` puts the two key marks at fixed places (the middle row, the middle of each
    quarter) instead: the relation then needs no position invariance, which networks without
    pooling learn slowly (docs/deploy.md); shapes, colours, sides, noise and distractors are
    drawn as before, from the same random stream.
    """

    def __init__(self, split: str = "train", config: RelationConfig = RelationConfig()):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split = split
        self.config = config
        self._split_id = 0 if split == "train" else 1

    def __len__(self) -> int:
        return self.config.num_train if self.split == "train" else self.config.num_val

    @property
    def classes(self) -> Tuple[str, ...]:
        return RELATION_CLASSES[self.config.relation]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _draw_mark(self, image: np.ndarray, y: int, x: int, shape: int, colour: int) -> None:
        patch = SHAPES[shape][None] * COLOURS[colour][:, None, None] * self.config.amplitude
        image[:, y:y + 5, x:x + 5] += patch

    def sample(self, index: int, epoch_key: Tuple[int, ...] = ()) -> Tuple[np.ndarray, int]:
        """The image (3, S, S) float32 and label of sample ``index``.

        ``epoch_key`` (the sampler's (seed, epoch)) selects a fresh picture for each epoch of
        the training split when ``config.fresh_train`` is on; validation images never change.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        cfg = self.config
        size = cfg.image_size
        fresh = tuple(epoch_key) if self.split == "train" and cfg.fresh_train else ()
        rng = np.random.default_rng([cfg.seed, self._split_id, index, *fresh])
        label = int(rng.integers(len(self.classes)))
        if cfg.relation == "shape+colour":
            same_shape, same_colour = label < 2, label % 2 == 0
        elif cfg.relation == "shape":
            same_shape, same_colour = label == 0, rng.random() < 1.0 / cfg.num_colours
        elif cfg.relation == "colour":
            same_shape, same_colour = rng.random() < 1.0 / cfg.num_shapes, label == 0
        else:
            same_shape, same_colour = rng.random() < 1.0 / cfg.num_shapes, rng.random() < 1.0 / cfg.num_colours
        shape_a, colour_a = int(rng.integers(cfg.num_shapes)), int(rng.integers(cfg.num_colours))
        shape_b = shape_a if same_shape else int((shape_a + rng.integers(1, cfg.num_shapes)) % cfg.num_shapes)
        colour_b = colour_a if same_colour else int((colour_a + rng.integers(1, cfg.num_colours)) % cfg.num_colours)
        image = rng.normal(0.0, cfg.noise, size=(3, size, size)).astype(np.float32)
        quarter, rows = size // 4, size - 5 + 1
        side_a, side_b = (0, size - quarter) if rng.random() < 0.5 else (size - quarter, 0)
        y_a = int(rng.integers(rows))
        y_b = int(rng.integers(rows))
        if cfg.relation == "height":  # the same row, or at least a quarter of the rows apart (cyclically)
            gap = rows // 4
            y_b = y_a if label == 0 else (y_a + int(rng.integers(gap, rows - gap + 1))) % rows
        if cfg.fixed_places:
            y_a = y_b = (size - 5) // 2
        for side, y, shape, colour in ((side_a, y_a, shape_a, colour_a), (side_b, y_b, shape_b, colour_b)):
            x = side + int(rng.integers(quarter - 5 + 1))
            if cfg.fixed_places:
                x = side + (quarter - 5) // 2
            self._draw_mark(image, y, x, shape, colour)
        for _ in range(cfg.num_distractors):
            x = quarter + int(rng.integers(size - 2 * quarter - 5 + 1))
            y = int(rng.integers(size - 5 + 1))
            self._draw_mark(image, y, x, int(rng.integers(cfg.num_shapes)), int(rng.integers(cfg.num_colours)))
        return image, label

    def __getitem__(self, key):
        index, epoch_key = _split_key(key)
        image, label = self.sample(index, epoch_key)
        return torch.from_numpy(image), label, ()

    def describe(self) -> dict:
        return {"kind": "builtin-relations", **dataclasses.asdict(self.config)}


# --------------------------------------------------------------------------------------------
# Transforms on PIL images (randomness from a numpy Generator passed in)
# --------------------------------------------------------------------------------------------

def _pil():
    from PIL import Image

    return Image


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, rng: np.random.Generator):
        for transform in self.transforms:
            image = transform(image, rng)
        return image

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.transforms))})"


class RandomResizedCrop:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize to ``size``."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def box(self, width: int, height: int, rng: np.random.Generator) -> Tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(width - w + 1))
                top = int(rng.integers(height - h + 1))
                return left, top, left + w, top + h
        side = min(width, height)  # fall back to a central square crop
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, image, rng):
        box = self.box(*image.size, rng)
        return image.resize((self.size, self.size), _pil().BICUBIC, box=box)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, rng):
        return image.transpose(_pil().FLIP_LEFT_RIGHT) if rng.random() < self.p else image

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ResizeCenterCrop:
    """Resize the shorter side to ``size / crop_pct``, then take the central ``size`` square
    (``crop_mode="squash"``: resize the whole image to ``size`` x ``size``, as official codes
    evaluate at 384); ``interpolation`` "bicubic" or "bilinear"."""

    def __init__(self, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic", crop_mode: str = "center"):
        if interpolation not in ("bicubic", "bilinear") or crop_mode not in ("center", "squash"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear' and crop_mode 'center' or 'squash', "
                             f"got {interpolation!r}, {crop_mode!r}")
        self.size, self.crop_pct, self.interpolation, self.crop_mode = size, crop_pct, interpolation, crop_mode

    def __call__(self, image, rng=None):
        resample = _pil().BICUBIC if self.interpolation == "bicubic" else _pil().BILINEAR
        if self.crop_mode == "squash":
            return image.resize((self.size, self.size), resample)
        width, height = image.size
        short = int(math.floor(self.size / self.crop_pct))
        scale = short / min(width, height)
        new_w, new_h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        image = image.resize((new_w, new_h), resample)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        return (f"ResizeCenterCrop(size={self.size}, crop_pct={self.crop_pct}, interpolation={self.interpolation!r}, "
                f"crop_mode={self.crop_mode!r})")


class RandAugmentLite:
    """``num_ops`` random photometric/geometric operations at magnitude ``magnitude`` (0-10).

    A small version of RandAugment (Cubuk et al., 2020) on PIL images: each operation is
    picked uniformly and applied with its strength scaled by magnitude/10 and a random sign.
    """

    OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "contrast",
           "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y", "posterize")

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0):
        self.num_ops, self.magnitude = num_ops, magnitude

    def _apply(self, image, op: str, level: float):
        from PIL import ImageEnhance, ImageOps

        Image = _pil()
        fill = (124, 116, 104)
        if op == "identity":
            return image
        if op == "autocontrast":
            return ImageOps.autocontrast(image)
        if op == "equalize":
            return ImageOps.equalize(image)
        if op == "rotate":
            return image.rotate(30.0 * level, resample=Image.BILINEAR, fillcolor=fill)
        if op == "solarize":
            return ImageOps.solarize(image, 256 - int(256 * abs(level)))
        if op == "posterize":
            return ImageOps.posterize(image, 8 - int(4 * abs(level)))
        if op in ("color", "contrast", "brightness", "sharpness"):
            enhancer = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
                        "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}[op]
            return enhancer(image).enhance(1.0 + 0.9 * level)
        if op in ("shear_x", "shear_y"):
            s = 0.3 * level
            coeffs = (1, s, 0, 0, 1, 0) if op == "shear_x" else (1, 0, 0, s, 1, 0)
            return image.transform(image.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=fill)
        dx = 0.45 * level * image.size[0] if op == "translate_x" else 0
        dy = 0.45 * level * image.size[1] if op == "translate_y" else 0
        return image.transform(image.size, Image.AFFINE, (1, 0, dx, 0, 1, dy), Image.BILINEAR, fillcolor=fill)

    def __call__(self, image, rng):
        for _ in range(self.num_ops):
            op = self.OPS[int(rng.integers(len(self.OPS)))]
            level = self.magnitude / 10.0 * (1.0 if rng.random() < 0.5 else -1.0)
            image = self._apply(image, op, level)
        return image

    def __repr__(self) -> str:
        return f"RandAugmentLite(num_ops={self.num_ops}, magnitude={self.magnitude})"


class ToNormalizedTensor:
    """PIL RGB image -> float32 (3, H, W), scaled to [0, 1] and normalised with ``mean``/``std``."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image, rng=None) -> torch.Tensor:
        array = np.asarray(image, dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        return (tensor - self.mean) / self.std

    def __repr__(self) -> str:
        return "ToNormalizedTensor()"


def train_transform(image_size: int, scale=(0.08, 1.0), hflip: float = 0.5, randaugment: Optional[Tuple[int, float]] = None) -> Compose:
    """The training pipeline: RandomResizedCrop, flip, optional RandAugment-lite, normalisation."""
    steps: List[Callable] = [RandomResizedCrop(image_size, scale=scale)]
    if hflip > 0:
        steps.append(RandomHorizontalFlip(hflip))
    if randaugment is not None:
        steps.append(RandAugmentLite(*randaugment))
    steps.append(ToNormalizedTensor())
    return Compose(steps)


def eval_transform(image_size: int, crop_pct: float = 0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   interpolation: str = "bicubic", crop_mode: str = "center") -> Compose:
    """The evaluation pipeline: resize, centre crop (:class:`ResizeCenterCrop`), normalisation with ``mean``/``std``."""
    return Compose([ResizeCenterCrop(image_size, crop_pct, interpolation, crop_mode), ToNormalizedTensor(mean, std)])


# --------------------------------------------------------------------------------------------
# Image folders (ImageNet layout)
# --------------------------------------------------------------------------------------------

def find_classes(root: str) -> List[str]:
    """Sorted class folder names under ``root``; a :class:`DataError` when there is none."""
    if not os.path.isdir(root):
        raise DataError(f"data folder not found: {root}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders (expected {root}/<class>/<image files>)")
    return classes


def _list_images(folder: str) -> List[str]:
    files = []
    for dirpath, _, names in os.walk(folder, followlinks=True):
        files.extend(os.path.join(dirpath, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(files)


class ImageFolder(Dataset):
    """Images in ``root/<class>/**/*.{jpg,jpeg,png,webp}``, labelled by their class folder.

    Args:
        root: the split folder (``DIR/train`` or ``DIR/val``).
        transform: a callable ``(PIL image, numpy Generator) -> tensor``.
        class_to_idx: the mapping of the training split; a folder of ``root`` not in it is a
            :class:`DataError` (a validation split with classes the model never saw).
        skip_policy: what to do with an image that cannot be read: ``"next"`` uses the next
            readable image instead (training: batches stay full and equal on every rank),
            ``"drop"`` leaves it out of its batch (evaluation: every image counts once).

    Unreadable or truncated images are never a crash: they are logged once and reported in
    the third element of each sample (their paths), so the caller can count them.
    """

    def __init__(self, root: str, transform: Callable, class_to_idx: Optional[Dict[str, int]] = None, skip_policy: str = "next"):
        if skip_policy not in ("next", "drop"):
            raise ValueError(f"skip_policy must be 'next' or 'drop', got {skip_policy!r}")
        self.root = root
        classes = find_classes(root)
        if class_to_idx is None:
            class_to_idx = {name: i for i, name in enumerate(classes)}
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise DataError(
                f"{root} has classes the training split does not have: {', '.join(unknown)} "
                f"(known classes: {', '.join(sorted(class_to_idx))})"
            )
        self.class_to_idx = dict(class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)
        self.samples: List[Tuple[str, int]] = []
        for name in classes:
            files = _list_images(os.path.join(root, name))
            if not files:
                raise DataError(
                    f"class folder {os.path.join(root, name)} holds no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images"
                )
            self.samples.extend((path, self.class_to_idx[name]) for path in files)
        self.transform = transform
        self.skip_policy = skip_policy

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.class_to_idx)

    def _load(self, path: str):
        Image = _pil()
        with Image.open(path) as image:
            return image.convert("RGB")

    def __getitem__(self, key):
        index, aug_key = _split_key(key)
        skipped: List[str] = []
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = self._load(path)
            except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for bad/truncated files
                _logger.warning("skipping unreadable image %s (%s)", path, err)
                skipped.append(path)
                if self.skip_policy == "drop":
                    return None, -1, tuple(skipped)
                continue
            return self.transform(image, _rng(aug_key, index)), label, tuple(skipped)
        raise DataError(f"none of the {len(self.samples)} images under {self.root} can be read")

    def describe(self) -> dict:
        return {"kind": "image-folder", "root": os.path.abspath(self.root), "classes": self.classes}


def image_folder_splits(data_dir: str, image_size: int, randaugment: Optional[Tuple[int, float]] = None,
                        crop_pct: float = 0.875) -> Tuple[ImageFolder, ImageFolder]:
    """The ``train`` and ``val`` splits of ``data_dir``, checked before any training starts."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data folder not found: {data_dir}")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data_dir, split)):
            raise DataError(f"{data_dir} has no '{split}' folder (expected {data_dir}/{split}/<class>/<images>)")
    train = ImageFolder(os.path.join(data_dir, "train"), train_transform(image_size, randaugment=randaugment))
    val = ImageFolder(os.path.join(data_dir, "val"), eval_transform(image_size, crop_pct), train.class_to_idx, skip_policy="drop")
    return train, val


# --------------------------------------------------------------------------------------------
# Sampling, batching, mixing
# --------------------------------------------------------------------------------------------

class EpochSampler(Sampler):
    """Keys ``(index, (seed, epoch))`` of one epoch, sharded over ``world_size`` processes.

    The order is a permutation drawn from (seed, epoch) (or the natural order when
    ``shuffle`` is off); rank r takes positions r, r + world_size, ... . With ``drop_last``
    every rank gets ``len(dataset) // world_size`` keys, so the k-th batches of all ranks
    together are exactly the k-th batch of one process with world_size times the batch size.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False):
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> List[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator:
        order = self._order()
        if self.drop_last:
            order = order[: self.num_samples // self.world_size * self.world_size]
        aug_key = (self.seed, self.epoch)
        return iter([(index, aug_key) for index in order[self.rank::self.world_size]])

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))


def collate(batch) -> Tuple[torch.Tensor, torch.Tensor, Tuple[str, ...]]:
    """Stack samples ``(image, label, skipped_paths)``; samples without an image are left out."""
    skipped = tuple(path for _, _, paths in batch for path in paths)
    kept = [(image, label) for image, label, _ in batch if image is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([image for image, _ in kept])
    labels = torch.tensor([label for _, label in kept], dtype=torch.long)
    return images, labels, skipped


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(N,) labels -> (N, num_classes) targets with ``smoothing`` spread over all classes."""
    off = smoothing / num_classes
    target = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return target.scatter_(1, labels[:, None], 1.0 - smoothing + off)


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """Mixup (Zhang et al., 2018) / CutMix (Yun et al., 2019) on a batch; alpha 0 turns one off."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def mix_batch(images: torch.Tensor, targets: torch.Tensor, config: MixConfig, rng: np.random.Generator):
    """Mix ``images`` (N, C, H, W) and soft ``targets`` (N, K) with their batch flipped.

    Returns new tensors; with probability ``1 - prob`` (or when disabled) the inputs unchanged.
    """
    if not config.enabled or images.shape[0] < 2 or rng.random() >= config.prob:
        return images, targets
    use_cutmix = config.cutmix_alpha > 0 and (config.mixup_alpha <= 0 or rng.random() < config.switch_prob)
    alpha = config.cutmix_alpha if use_cutmix else config.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    flipped = images.flip(0)
    if use_cutmix:
        height, width = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    else:
        images = images * lam + flipped * (1.0 - lam)
    return images, targets * lam + targets.flip(0) * (1.0 - lam)
