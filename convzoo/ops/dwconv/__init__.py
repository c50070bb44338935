# PLACEHOLDER (skeleton): replaced by the dwconv work.
import torch.nn.functional as F


def dwconv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, impl="auto"):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])
