"""Print the README's model table, generated from the registry.

Every registered model is built on the meta device (no memory, no weights), counted in its
deployed form (``convzoo.reparameterize``: RepLKNet's kernels merged, BatchNorm folded) at its
paper's resolution, and shown beside the figure its paper gives.

    python scripts/model_table.py > /tmp/table.md
"""
from __future__ import annotations

import torch

import convzoo
from convzoo.analysis import count_flops, count_params

# model -> (resolution, paper params, paper MACs); from the papers (see shared DESIGN.md).
PAPER = {
    "replknet_31b": (224, "79M", "15.3G"),
    "replknet_31l": (384, "172M", "96.0G"),
    "replknet_xl": (320, "335M", "128.7G"),
    "convnext_tiny": (224, "28.6M", "4.5G"),
    "convnext_small": (224, "50M", "8.7G"),
    "convnext_base": (224, "89M", "15.4G"),
    "convnext_large": (224, "198M", "34.4G"),
    "convnext_xlarge": (224, "350M", "60.9G"),
    "internimage_t": (224, "30M", "5G"),
    "internimage_s": (224, "50M", "8G"),
    "internimage_b": (224, "97M", "16G"),
    "resnet50": (224, "25.6M", "4.1G"),
    "mobilenetv1_100": (224, "4.2M", "569M"),
    "mobilenetv2_100": (224, "3.5M", "300M"),
    "mobilenetv3_large_100": (224, "5.5M", "217M"),
    "mobilenetv3_small_100": (224, "2.5M", "56M"),
    "squeezenet1_0": (224, "1.25M", "819M"),
    "squeezenet1_1": (224, "1.24M", "352M"),
    "shufflenetv2_x1_0": (224, "2.3M", "146M"),
    # UniRepLKNet: its README (AILab-CVC/UniRepLKNet)
    "unireplknet_a": (224, "4.4M", "0.6G"),
    "unireplknet_f": (224, "6.2M", "0.9G"),
    "unireplknet_p": (224, "10.7M", "1.6G"),
    "unireplknet_n": (224, "18.3M", "2.8G"),
    "unireplknet_t": (224, "31M", "4.9G"),
    "unireplknet_s": (224, "56M", "9.1G"),
    "unireplknet_b": (384, "98M", "47.2G"),
    "unireplknet_l": (384, "218M", "105.4G"),
    "unireplknet_xl": (384, "386M", "187G"),
}


def human(value: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(int(value))


def table_rows():
    """One markdown row per registered classifier (the segmentation models, ``upernet_*`` and
    ``semfpn_*`` on every backbone, are left out)."""
    for name in convzoo.list_models():
        if name.startswith(("upernet_", "semfpn_")):
            continue
        resolution, paper_params, paper_macs = PAPER.get(name, (224, "", ""))
        with torch.device("meta"):
            model = convzoo.create_model(name)
        trained_params = count_params(model)
        convzoo.reparameterize(model)
        macs = count_flops(model, (1, 3, resolution, resolution)).macs
        yield (f"| `{name}` | {human(trained_params)} | {human(count_params(model))} | {human(macs)} | "
               f"{resolution} | {paper_params} | {paper_macs} |")


def main() -> None:
    print("| model | params (training form) | params (deployed) | MACs (deployed) | resolution | paper params | paper MACs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in table_rows():
        print(row)


if __name__ == "__main__":
    main()
