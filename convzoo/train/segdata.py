"""Data for semantic segmentation: the built-in band data set, mask folders, joint transforms.

Samples follow the conventions of :mod:`convzoo.train.data` (keys ``index`` or
``(index, (seed, epoch))``, all randomness from a generator seeded by the key), but a sample is
``(image (3, H, W) float32, mask (H, W) int64, skipped_paths)``; mask values are class ids or
``ignore_index`` (255), which no loss or metric counts.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import COLOURS, IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, SHAPES, DataError, _pil, _rng, _split_key

_logger = logging.getLogger(__name__)

IGNORE_INDEX = 255


# --------------------------------------------------------------------------------------------
# The built-in data set: bands labelled by a far-away marker
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BandsConfig:
    """Parameters of the built-in segmentation data set (see :class:`BandsDataset`)."""

    height: int = 32
    width: int = 256
    num_train: int = 2048
    num_val: int = 256
    num_colours: int = 3
    min_band: int = 8
    max_band: int = 12
    noise: float = 0.3
    amplitude: float = 2.0
    line_amplitude: float = 1.0
    ignore_margin: int = 2
    fresh_train: bool = True
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.num_colours <= len(COLOURS):
            raise ValueError(f"num_colours must be in [2, {len(COLOURS)}], got {self.num_colours}")
        if not 8 <= self.min_band <= self.max_band:
            raise ValueError(f"need 8 <= min_band <= max_band (a band holds a 5x5 marker), got {self.min_band}, {self.max_band}")
        if self.height < self.max_band or self.width < 16:
            raise ValueError(f"height must be >= max_band ({self.max_band}) and width >= 16, got {self.height}x{self.width}")
        if self.num_train < 1 or self.num_val < 1 or self.ignore_margin < 0:
            raise ValueError("num_train and num_val must be >= 1 and ignore_margin >= 0")


@dataclasses.dataclass(frozen=True)
class BandsLayout:
    """The noise-free content of one sample: line rows, and per band its rows, colour and marker."""

    lines: Tuple[int, ...]
    bands: Tuple[Tuple[int, int, int, int, int], ...]  # (top, bottom (exclusive), colour, marker y, marker x)


class BandsDataset(Dataset):
    """Noisy images cut into horizontal bands by thin lines; each band's class is the colour of
    the one marker it holds, usually far away.

    A (3, H, W) image holds Gaussian noise, full-width grey lines of one pixel (line rows
    spaced ``min_band`` to ``max_band`` apart, from a random phase, so every row is equally
    likely to be a line), and in each band between two lines (or a line and the image border)
    that is tall enough, one 5x5 plus-shaped marker at a random place in one of
    ``num_colours`` colours of equal brightness. The mask labels every pixel of a band with its
    marker's colour; lines, the markers with ``ignore_margin`` pixels around them, and bands too
    thin for a marker are ``ignore_index``. Colours are drawn independently of the geometry, so
    neither position nor any local patch away from a marker tells a pixel's class: a model
    must find the marker of the pixel's own band, up to the image width away, and not the
    closer one of the next band.
    """

    def __init__(self, split: str = "train", config: BandsConfig = BandsConfig()):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split, self.config = split, config
        self._split_id = 0 if split == "train" else 1

    def __len__(self) -> int:
        return self.config.num_train if self.split == "train" else self.config.num_val

    @property
    def num_classes(self) -> int:
        return self.config.num_colours

    @property
    def classes(self) -> Tuple[str, ...]:
        return tuple(("red", "green", "blue")[: self.config.num_colours])

    def layout(self, index: int, epoch_key: Tuple[int, ...] = ()) -> BandsLayout:
        """The lines and bands of sample ``index`` (what :meth:`sample` draws, without noise)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        cfg = self.config
        fresh = tuple(epoch_key) if self.split == "train" and cfg.fresh_train else ()
        rng = np.random.default_rng([cfg.seed, self._split_id, index, *fresh])
        lines = []
        y = int(rng.integers(cfg.max_band)) - cfg.max_band
        while True:
            y += int(rng.integers(cfg.min_band, cfg.max_band + 1))
            if y >= cfg.height:
                break
            if y >= 0:
                lines.append(y)
        bands = []
        edges = [-1] + lines + [cfg.height]
        for top, bottom in zip(edges[:-1], edges[1:]):
            top += 1  # the rows strictly between two lines
            colour = int(rng.integers(cfg.num_colours))
            if bottom - top < 5:
                bands.append((top, bottom, -1, -1, -1))
                continue
            my = top + int(rng.integers(bottom - top - 5 + 1))
            mx = int(rng.integers(cfg.width - 5 + 1))
            bands.append((top, bottom, colour, my, mx))
        return BandsLayout(tuple(lines), tuple(bands))

    def render(self, layout: BandsLayout, noise: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, np.ndarray]:
        """(image (3, H, W) float32, mask (H, W) int64) of ``layout``; noise from ``noise`` if given."""
        cfg = self.config
        h, w = cfg.height, cfg.width
        image = np.zeros((3, h, w), np.float32) if noise is None else noise.normal(0.0, cfg.noise, (3, h, w)).astype(np.float32)
        mask = np.full((h, w), IGNORE_INDEX, np.int64)
        plus = SHAPES[0]
        for top, bottom, colour, my, mx in layout.bands:
            if colour < 0:
                continue
            mask[top:bottom] = colour
            image[:, my:my + 5, mx:mx + 5] += plus[None] * COLOURS[colour][:, None, None] * cfg.amplitude
            m = cfg.ignore_margin
            mask[max(0, my - m):my + 5 + m, max(0, mx - m):mx + 5 + m] = IGNORE_INDEX
        for y in layout.lines:
            image[:, y, :] += cfg.line_amplitude
            mask[y, :] = IGNORE_INDEX
        return image, mask

    def sample(self, index: int, epoch_key: Tuple[int, ...] = ()) -> Tuple[np.ndarray, np.ndarray]:
        """The noisy image and the mask of sample ``index`` (new each epoch with ``fresh_train``)."""
        cfg = self.config
        fresh = tuple(epoch_key) if self.split == "train" and cfg.fresh_train else ()
        noise = np.random.default_rng([cfg.seed, self._split_id, index, *fresh, 1])
        return self.render(self.layout(index, epoch_key), noise)

    def __getitem__(self, key):
        index, epoch_key = _split_key(key)
        image, mask = self.sample(index, epoch_key)
        return torch.from_numpy(image), torch.from_numpy(mask), ()

    def describe(self) -> dict:
        return {"kind": "builtin-bands", **dataclasses.asdict(self.config)}


# --------------------------------------------------------------------------------------------
# Mask folders: ADE20K's layout and a generic images/ + masks/ pairing by file stem
# --------------------------------------------------------------------------------------------

MASK_EXTENSIONS = (".png",)
# (images folder, masks folder) of each split, per layout
LAYOUTS = {
    "ade20k": {"train": ("images/training", "annotations/training"), "val": ("images/validation", "annotations/validation")},
    "generic": {"train": ("images/train", "masks/train"), "val": ("images/val", "masks/val")},
}
_SHOW = 5  # file names quoted in an error message


def detect_layout(root: str) -> str:
    """``"ade20k"`` or ``"generic"`` from the folders under ``root``; a :class:`DataError` otherwise."""
    if not os.path.isdir(root):
        raise DataError(f"data folder not found: {root}")
    for name, splits in LAYOUTS.items():
        if all(os.path.isdir(os.path.join(root, folder)) for folder in splits["train"]):
            return name
    raise DataError(
        f"{root} has neither segmentation layout: ADE20K's images/training/*.jpg + annotations/training/*.png "
        f"(and .../validation), or images/train/ + masks/train/ (and .../val) with masks named like their images"
    )


def _files_by_stem(folder: str, extensions: Sequence[str]) -> Dict[str, str]:
    files: Dict[str, str] = {}
    for dirpath, _, names in os.walk(folder, followlinks=True):
        for name in sorted(names):
            if not name.lower().endswith(tuple(extensions)):
                continue
            path = os.path.join(dirpath, name)
            stem = os.path.splitext(os.path.relpath(path, folder))[0]
            if stem in files:
                raise DataError(f"{files[stem]} and {path} have the same name stem; keep one of them")
            files[stem] = path
    return files


def _quote(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:_SHOW])
    return shown + (f" and {len(paths) - _SHOW} more" if len(paths) > _SHOW else "")


def pair_images_and_masks(image_dir: str, mask_dir: str) -> List[Tuple[str, str]]:
    """Sorted ``(image path, mask path)`` pairs matched by file stem (relative to the folders).

    An image without a mask or a mask without an image is a :class:`DataError` naming them.
    """
    for folder in (image_dir, mask_dir):
        if not os.path.isdir(folder):
            raise DataError(f"folder not found: {folder}")
    images, masks = _files_by_stem(image_dir, IMAGE_EXTENSIONS), _files_by_stem(mask_dir, MASK_EXTENSIONS)
    if not images:
        raise DataError(f"{image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    lonely = sorted(images[s] for s in images if s not in masks)
    if lonely:
        raise DataError(f"{len(lonely)} image(s) without a mask: {_quote(lonely)}; add {mask_dir}/<same name>.png "
                        f"for each, or remove the image(s)")
    orphans = sorted(masks[s] for s in masks if s not in images)
    if orphans:
        raise DataError(f"{len(orphans)} mask(s) without an image: {_quote(orphans)}; add the image(s) to {image_dir} "
                        f"under the same name, or remove the mask(s)")
    return [(images[s], masks[s]) for s in sorted(images)]


def read_mask(path: str, reduce_zero_label: bool = False) -> np.ndarray:
    """(H, W) int64 class ids of a mask PNG (8-bit grey or palette indices, or 16-bit).

    ``reduce_zero_label`` (ADE20K's convention): id 0 ("other") becomes ``IGNORE_INDEX`` and
    every other id ``k`` becomes ``k - 1``.
    """
    Image = _pil()
    with Image.open(path) as mask:
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise DataError(f"{path} is a {mask.mode} image, not a mask of class ids (8-bit grey/palette or 16-bit)")
        ids = np.asarray(mask).astype(np.int64)
    if reduce_zero_label:
        ids = np.where(ids == 0, IGNORE_INDEX, ids - 1)
        ids[ids == IGNORE_INDEX - 1] = IGNORE_INDEX
    return ids


@dataclasses.dataclass
class MaskScan:
    """What :func:`scan_pairs` found: readable pairs, unreadable files, the largest class id."""

    pairs: List[Tuple[str, str]]
    unreadable: List[str]
    max_id: int


def scan_pairs(pairs: Sequence[Tuple[str, str]], reduce_zero_label: bool, ignore_index: int = IGNORE_INDEX) -> MaskScan:
    """Read every mask and every image header once, before training.

    Unreadable files are skipped with a warning (and listed); a mask whose size differs from its
    image is a :class:`DataError` naming the pairs.
    """
    Image = _pil()
    kept, unreadable, mismatched, max_id = [], [], [], -1
    for image_path, mask_path in pairs:
        try:
            with Image.open(image_path) as image:
                image_size = image.size
        except (OSError, SyntaxError, ValueError) as err:
            _logger.warning("skipping unreadable image %s (%s)", image_path, err)
            unreadable.append(image_path)
            continue
        try:
            ids = read_mask(mask_path, reduce_zero_label)
        except DataError:
            raise
        except (OSError, SyntaxError, ValueError) as err:
            _logger.warning("skipping unreadable mask %s (%s)", mask_path, err)
            unreadable.append(mask_path)
            continue
        if (ids.shape[1], ids.shape[0]) != image_size:
            mismatched.append(f"{mask_path} is {ids.shape[1]}x{ids.shape[0]} but {image_path} is {image_size[0]}x{image_size[1]}")
            continue
        valid = ids[ids != ignore_index]
        if valid.size:
            max_id = max(max_id, int(valid.max()))
        kept.append((image_path, mask_path))
    if mismatched:
        raise DataError(f"{len(mismatched)} mask(s) of another size than their image: {_quote(mismatched)}; "
                        f"a mask must have its image's width and height (resize it with nearest-neighbour)")
    return MaskScan(kept, unreadable, max_id)


def check_class_ids(pairs: Sequence[Tuple[str, str]], num_classes: int, reduce_zero_label: bool,
                    ignore_index: int = IGNORE_INDEX) -> None:
    """A :class:`DataError` counting the pixels and masks with ids >= ``num_classes`` (not ignore)."""
    bad_files, bad_pixels, worst = [], 0, -1
    for _, mask_path in pairs:
        ids = read_mask(mask_path, reduce_zero_label)
        bad = (ids >= num_classes) & (ids != ignore_index)
        count = int(bad.sum())
        if count:
            bad_files.append(mask_path)
            bad_pixels += count
            worst = max(worst, int(ids[bad].max()))
    if bad_files:
        hint = "" if reduce_zero_label else " or --reduce-zero-label (ADE20K's 0 = 'other')"
        raise DataError(
            f"{bad_pixels} pixel(s) in {len(bad_files)} mask(s) have class ids >= num_classes ({num_classes}), up to "
            f"{worst}, and are not the ignore index {ignore_index}: {_quote(bad_files)}; pass --num-classes {worst + 1}"
            f"{hint}, or set those pixels to {ignore_index}"
        )


# --------------------------------------------------------------------------------------------
# Joint transforms of an image (PIL) and its mask (numpy ids)
# --------------------------------------------------------------------------------------------

def _resize_pair(image, mask: np.ndarray, size: Tuple[int, int]):
    """Resize to ``size`` (W, H): the image bilinearly, the mask by nearest neighbour."""
    Image = _pil()
    image = image.resize(size, Image.BILINEAR)
    mask_img = Image.fromarray(mask.astype(np.int32), mode="I").resize(size, Image.NEAREST)
    return image, np.asarray(mask_img).astype(np.int64)


def _to_tensor(image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return (array - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class SegTrainTransform:
    """mmsegmentation's training pipeline, scaled by ``crop_size``: random resize (short side
    ``crop_size`` x U(ratio)), random ``crop_size`` crop (padded with ignore/zero when smaller),
    horizontal flip, photometric distortion (brightness, contrast, saturation), normalisation."""

    def __init__(self, crop_size: int, ratio=(0.5, 2.0), hflip: float = 0.5, photometric: bool = True):
        self.crop_size, self.ratio, self.hflip, self.photometric = crop_size, tuple(ratio), hflip, photometric

    def _photometric(self, image, rng: np.random.Generator):
        from PIL import ImageEnhance

        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            if rng.random() < 0.5:
                image = enhancer(image).enhance(float(rng.uniform(0.75, 1.25) if enhancer is ImageEnhance.Brightness
                                                       else rng.uniform(0.5, 1.5)))
        return image

    def __call__(self, image, mask: np.ndarray, rng: np.random.Generator):
        width, height = image.size
        scale = self.crop_size * rng.uniform(*self.ratio) / min(width, height)
        image, mask = _resize_pair(image, mask, (max(1, round(width * scale)), max(1, round(height * scale))))
        width, height = image.size
        top, left = int(rng.integers(max(height - self.crop_size, 0) + 1)), int(rng.integers(max(width - self.crop_size, 0) + 1))
        image = image.crop((left, top, left + min(width, self.crop_size), top + min(height, self.crop_size)))
        mask = mask[top:top + self.crop_size, left:left + self.crop_size]
        if rng.random() < self.hflip:
            image, mask = image.transpose(_pil().FLIP_LEFT_RIGHT), mask[:, ::-1]
        if self.photometric:
            image = self._photometric(image, rng)
        tensor = _to_tensor(image)
        out_image = torch.zeros(3, self.crop_size, self.crop_size)
        out_mask = torch.full((self.crop_size, self.crop_size), IGNORE_INDEX, dtype=torch.int64)
        out_image[:, :tensor.shape[1], :tensor.shape[2]] = tensor
        out_mask[:mask.shape[0], :mask.shape[1]] = torch.from_numpy(np.ascontiguousarray(mask))
        return out_image, out_mask

    def __repr__(self) -> str:
        return f"SegTrainTransform(crop_size={self.crop_size}, ratio={self.ratio}, hflip={self.hflip})"


class SegEvalTransform:
    """Resize so that the short side is ``size`` (mask by nearest neighbour), normalise."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, mask: np.ndarray, rng=None):
        width, height = image.size
        scale = self.size / min(width, height)
        image, mask = _resize_pair(image, mask, (max(1, round(width * scale)), max(1, round(height * scale))))
        return _to_tensor(image), torch.from_numpy(mask)

    def __repr__(self) -> str:
        return f"SegEvalTransform(size={self.size})"


class SegmentationFolder(Dataset):
    """Image/mask pairs (from :func:`pair_images_and_masks`, checked by :func:`scan_pairs`).

    A file that becomes unreadable after the scan is handled as :class:`~convzoo.train.data.ImageFolder`
    does: ``skip_policy="next"`` takes the next pair, ``"drop"`` leaves it out of its batch;
    its path is reported in the sample's third element.
    """

    def __init__(self, pairs: Sequence[Tuple[str, str]], transform, num_classes: int, reduce_zero_label: bool = False,
                 skip_policy: str = "next", root: str = "", unreadable: Sequence[str] = ()):
        if skip_policy not in ("next", "drop"):
            raise ValueError(f"skip_policy must be 'next' or 'drop', got {skip_policy!r}")
        if not pairs:
            raise DataError(f"{root or 'the data set'} has no readable image/mask pairs")
        self.pairs, self.transform, self.num_classes = list(pairs), transform, num_classes
        self.reduce_zero_label, self.skip_policy, self.root = reduce_zero_label, skip_policy, root
        self.unreadable = list(unreadable)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key):
        index, aug_key = _split_key(key)
        skipped: List[str] = []
        for attempt in range(len(self.pairs)):
            image_path, mask_path = self.pairs[(index + attempt) % len(self.pairs)]
            try:
                with _pil().open(image_path) as image:
                    image = image.convert("RGB")
                mask = read_mask(mask_path, self.reduce_zero_label)
            except (OSError, SyntaxError, ValueError) as err:
                _logger.warning("skipping unreadable pair %s / %s (%s)", image_path, mask_path, err)
                skipped.append(image_path)
                if self.skip_policy == "drop":
                    return None, None, tuple(skipped)
                continue
            image_tensor, mask_tensor = self.transform(image, mask, _rng(aug_key, index))
            return image_tensor, mask_tensor, tuple(skipped)
        raise DataError(f"none of the {len(self.pairs)} image/mask pairs under {self.root} can be read")

    def describe(self) -> dict:
        return {"kind": "mask-folder", "root": os.path.abspath(self.root), "num_classes": self.num_classes,
                "reduce_zero_label": self.reduce_zero_label}


def segmentation_folder_splits(root: str, crop_size: int, num_classes: Optional[int] = None,
                               reduce_zero_label: bool = False, eval_size: Optional[int] = None,
                               splits: Sequence[str] = ("train", "val")) -> Dict[str, SegmentationFolder]:
    """The splits of a mask folder (:data:`LAYOUTS`), every file checked before any training.

    ``num_classes`` defaults to the largest class id of the training masks + 1; ids at or above
    it (not the ignore index) in any split are a :class:`DataError`.
    """
    layout = detect_layout(root)
    scans = {}
    for split in splits:
        image_dir, mask_dir = (os.path.join(root, folder) for folder in LAYOUTS[layout][split])
        scans[split] = scan_pairs(pair_images_and_masks(image_dir, mask_dir), reduce_zero_label)
    if num_classes is None:
        num_classes = scans[splits[0]].max_id + 1
        if num_classes < 1:
            raise DataError(f"the {splits[0]} masks under {root} hold no class ids (all pixels are the ignore index)")
    for split in splits:
        check_class_ids(scans[split].pairs, num_classes, reduce_zero_label)
    datasets = {}
    for split in splits:
        transform = SegTrainTransform(crop_size) if split == "train" else SegEvalTransform(eval_size or crop_size)
        datasets[split] = SegmentationFolder(scans[split].pairs, transform, num_classes, reduce_zero_label,
                                             skip_policy="next" if split == "train" else "drop",
                                             root=os.path.join(root, LAYOUTS[layout][split][0]),
                                             unreadable=scans[split].unreadable)
    return datasets


def seg_collate(batch) -> Tuple[torch.Tensor, torch.Tensor, Tuple[str, ...]]:
    """Stack ``(image, mask, skipped)`` samples, padding smaller ones (image 0, mask ignore) to
    the batch's largest size; samples without an image are left out."""
    skipped = tuple(path for _, _, paths in batch for path in paths)
    kept = [(image, mask) for image, mask, _ in batch if image is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    height = max(image.shape[-2] for image, _ in kept)
    width = max(image.shape[-1] for image, _ in kept)
    images = torch.zeros(len(kept), kept[0][0].shape[0], height, width)
    masks = torch.full((len(kept), height, width), IGNORE_INDEX, dtype=torch.long)
    for i, (image, mask) in enumerate(kept):
        images[i, :, :image.shape[-2], :image.shape[-1]] = image
        masks[i, :mask.shape[-2], :mask.shape[-1]] = mask
    return images, masks, skipped
