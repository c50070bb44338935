"""convzoo: modern CNN kernels and the models built on them.

Large-kernel depthwise convolution (RepLKNet), deformable convolution v1/v2/v3/v4,
deformable RoI pooling, and the RepLKNet / ConvNeXt / InternImage / DCNv2-ResNet /
MobileNet / SqueezeNet / ShuffleNet families, in plain PyTorch everywhere and Triton
kernels on NVIDIA GPUs.
"""
from . import ops, layers
from .layers.reparam import is_reparameterized, reparameterize
from .models import create_model, list_models, load_checkpoint, save_checkpoint
from .deploy.optimize import optimize_for_inference

__version__ = "0.1.0"
__all__ = ["ops", "layers", "create_model", "list_models", "reparameterize", "is_reparameterized", "load_checkpoint", "save_checkpoint",
           "optimize_for_inference"]
