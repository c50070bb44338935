# PLACEHOLDER (skeleton): replaced by the RoI work.
def _todo(*args, **kwargs):
    raise NotImplementedError("RoI operators are being written")


roi_align = deform_roi_pool = modulated_deform_roi_pool = ps_roi_pool = deform_ps_roi_pool = _todo
