# PLACEHOLDER (skeleton): replaced by the dcnv3 work.
def DCNv3(*args, **kwargs):
    raise NotImplementedError('DCNv3 is being written')


