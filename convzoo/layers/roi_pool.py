# PLACEHOLDER (skeleton): replaced by the roi_pool work.
def DeformRoIPool(*args, **kwargs):
    raise NotImplementedError('DeformRoIPool is being written')


def ModulatedDeformRoIPool(*args, **kwargs):
    raise NotImplementedError('ModulatedDeformRoIPool is being written')


def DeformPSRoIPool(*args, **kwargs):
    raise NotImplementedError('DeformPSRoIPool is being written')


