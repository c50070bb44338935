"""Functional operators: large-kernel depthwise conv, deformable conv v1/v2/v3, RoI pooling.

Each family lives in its own sub-package with ``reference.py`` (plain PyTorch: the CPU path,
the test oracle, the benchmark baseline), optionally ``triton.py`` (the CUDA path), and an
``__init__.py`` holding the public function, which validates its arguments and dispatches on
``impl="auto" | "triton" | "reference"``.
"""
from .dwconv import dwconv2d
from .deform_conv import deform_conv2d
from .dcnv3 import dcnv3, dcnv3_offsets_to_torchvision, torchvision_offsets_to_dcnv3
from .roi import (
    roi_align,
    ps_roi_align,
    roi_pool,
    ps_roi_pool,
    deform_roi_pool,
    modulated_deform_roi_pool,
    deform_ps_roi_pool,
)

__all__ = [
    "dwconv2d",
    "deform_conv2d",
    "dcnv3",
    "dcnv3_offsets_to_torchvision",
    "torchvision_offsets_to_dcnv3",
    "roi_align",
    "ps_roi_align",
    "roi_pool",
    "deform_roi_pool",
    "modulated_deform_roi_pool",
    "ps_roi_pool",
    "deform_ps_roi_pool",
]
