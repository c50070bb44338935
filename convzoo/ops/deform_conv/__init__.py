# PLACEHOLDER (skeleton): replaced by the deform_conv work.
def deform_conv2d(x, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None, impl="auto"):
    raise NotImplementedError("deform_conv2d is being written")
