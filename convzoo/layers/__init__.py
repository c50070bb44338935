"""``nn.Module`` layers built on :mod:`convzoo.ops`.

Anything that can be re-parameterized has a ``reparameterize()`` method that turns it into
its inference form in place; :func:`convzoo.reparameterize` walks a model and calls it.
"""
from .activations import HardSigmoid, HardSwish, LUTSigmoid, LUTSiLU, ShiftLeakyReLU
from .common import DropPath, GlobalResponseNorm, LayerNorm2d, SqueezeExcite, make_divisible, to_channels_first, to_channels_last
from .reparam import DilatedReparamBlock, ReparamLargeKernelConv, fuse_conv_bn, is_reparameterized, reparameterize
from .deform_conv import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2d, ModulatedDeformConv2dPack
from .dcnv3 import DCNv3
from .roi_pool import (
    RoIAlign,
    RoIPool,
    PSRoIAlign,
    PSRoIPool,
    MultiScaleRoIAlign,
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformRoIPool,
    ModulatedDeformRoIPoolPack,
    DeformPSRoIPool,
    DeformPSRoIPoolPack,
)

__all__ = [
    "HardSigmoid",
    "HardSwish",
    "LUTSigmoid",
    "LUTSiLU",
    "ShiftLeakyReLU",
    "DropPath",
    "GlobalResponseNorm",
    "LayerNorm2d",
    "SqueezeExcite",
    "make_divisible",
    "to_channels_first",
    "to_channels_last",
    "ReparamLargeKernelConv",
    "DilatedReparamBlock",
    "fuse_conv_bn",
    "reparameterize",
    "is_reparameterized",
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "DCNv3",
    "RoIAlign",
    "RoIPool",
    "PSRoIAlign",
    "PSRoIPool",
    "MultiScaleRoIAlign",
    "DeformRoIPool",
    "ModulatedDeformRoIPool",
    "ModulatedDeformRoIPoolPack",
    "DeformPSRoIPool",
    "DeformRoIPoolPack",
    "DeformPSRoIPoolPack",
]
