"""``convzoo predict``: the mask a segmentation model predicts for one image, as a picture."""
from __future__ import annotations

import argparse
import os

from . import UsageError, parse_model_args
from . import _segmentation as _seg

_DESCRIPTION = """\
Predict the class of every pixel of one image with a segmentation model and write the
colour mask blended over the image (--out, PNG), optionally also the mask of class ids
(--mask-out, 8-bit PNG for up to 256 classes, else 16-bit).

The image is resized so that its short side is --image-size (default: the training run's
evaluation size, else 512), normalised with the ImageNet mean and std, and the scores are
resized back to the image's own size before the arg-max."""

_EPILOG = """\
examples:
  convzoo predict --model upernet_convnext_tiny --checkpoint runs/ade/checkpoint.pt --image room.jpg --out room_mask.png
  convzoo predict --model semfpn_resnet50 --checkpoint model.safetensors --image street.png --out mask.png \\
      --mask-out ids.png --mode slide --crop-size 512 --flip --alpha 0.6"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="segment one image with a segmentation model: colour mask blended over the image",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="NAME", help="registered segmentation model (upernet_* or semfpn_*)")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a training checkpoint of `convzoo train --task segmentation` or a convzoo .safetensors file")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the model's config (as in training), VALUE a Python literal")
    parser.add_argument("--image", required=True, metavar="PATH", help="the image (JPEG, PNG, WebP)")
    parser.add_argument("--out", required=True, metavar="PNG", help="where to write the blended colour mask")
    parser.add_argument("--mask-out", metavar="PNG", help="also write the class ids as a PNG")
    parser.add_argument("--image-size", type=int, metavar="PX", help="short side the model sees (default: the run's, else 512)")
    parser.add_argument("--mode", choices=("whole", "slide"), default="whole", help="inference mode (default: whole)")
    parser.add_argument("--crop-size", type=int, metavar="PX", help="--mode slide: window side (default: --image-size)")
    parser.add_argument("--stride", type=int, metavar="PX", help="--mode slide: window step (default: 2/3 of the window)")
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the colour mask (default: 0.5)")
    parser.add_argument("--weights", choices=("auto", "model", "ema"), default="auto",
                        help="training checkpoints: which weights (auto: EMA when present)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch")
    parser.set_defaults(func=run)


def palette(num_classes: int):
    """(num_classes, 3) uint8 colours: PASCAL VOC's bit-interleaved palette (distinct, fixed)."""
    import numpy as np

    colours = np.zeros((num_classes, 3), np.uint8)
    for k in range(num_classes):
        value, shift = k + 1, 7
        while value:
            for channel in range(3):
                colours[k, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return colours


def _check_paths(args) -> None:
    for path, what in ((args.checkpoint, "checkpoint"), (args.image, "image")):
        if not os.path.isfile(path):
            raise UsageError(f"{what} file not found: {path}")
    for path, flag in ((args.out, "--out"), (args.mask_out, "--mask-out")):
        if path is None:
            continue
        if not path.lower().endswith(".png"):
            raise UsageError(f"{flag} must name a .png file, got {path}")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UsageError(f"{flag}: folder {folder} does not exist")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.mode == "slide" and not (args.crop_size or args.image_size):
        raise UsageError("--mode slide needs --crop-size PX (or --image-size)")


def _save_png(image, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.png"
    image.save(tmp)
    os.replace(tmp, path)


def run(args) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from ..train.distributed import pick_device
    from ..train.segdata import _to_tensor
    from ..train.segmentation import infer_logits
    from .eval import _load_model, _training_state

    if args.threads:
        torch.set_num_threads(args.threads)
    _check_paths(args)
    _seg.check_model(args.model)
    parse_model_args(args.model_arg)
    try:
        device = pick_device(args.device)
        with Image.open(args.image) as image:
            image = image.convert("RGB")
    except ValueError as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(f"cannot read the image {args.image} ({err}); pass a JPEG, PNG or WebP file") from None
    state = _training_state(args.checkpoint)
    model, weights = _load_model(args, None, state)
    model = model.to(device).eval()
    size = args.image_size or (state or {}).get("meta", {}).get("data", {}).get("eval_size") or 512
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
    x = _to_tensor(resized)[None].to(device)
    with torch.no_grad():
        scores = infer_logits(model, x, model.num_classes, args.mode, args.crop_size or args.image_size, args.stride, args.flip)
        scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
    ids = scores.argmax(1)[0].cpu().numpy()
    colours = palette(model.num_classes)[ids]
    blended = (1.0 - args.alpha) * np.asarray(image, np.float32) + args.alpha * colours.astype(np.float32)
    _save_png(Image.fromarray(blended.round().clip(0, 255).astype(np.uint8)), args.out)
    if args.mask_out:
        mask = ids.astype(np.uint8) if model.num_classes <= 256 else ids.astype(np.uint16)
        _save_png(Image.fromarray(mask), args.mask_out)
    counts = np.bincount(ids.ravel(), minlength=model.num_classes) / ids.size
    present = ", ".join(f"{k}: {100 * counts[k]:.1f}%" for k in np.argsort(-counts) if counts[k] > 0)
    print(f"{args.model} ({weights} weights): {args.image} ({width}x{height}) -> {args.out}"
          + (f", {args.mask_out}" if args.mask_out else ""))
    print(f"  classes (pixel share)  {present}")
    return 0
