# PLACEHOLDER (skeleton): replaced by the deform_conv work.
def DeformConv2d(*args, **kwargs):
    raise NotImplementedError('DeformConv2d is being written')


def ModulatedDeformConv2d(*args, **kwargs):
    raise NotImplementedError('ModulatedDeformConv2d is being written')


