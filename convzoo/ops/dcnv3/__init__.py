# PLACEHOLDER (skeleton): replaced by the dcnv3 work.
def dcnv3(*args, **kwargs):
    raise NotImplementedError("dcnv3 is being written")


def dcnv3_offsets_to_torchvision(*args, **kwargs):
    raise NotImplementedError


def torchvision_offsets_to_dcnv3(*args, **kwargs):
    raise NotImplementedError
