# expect: share is too small
def agreement(a, b):
    return float((a.argmax(dim=1) != b.argmax(dim=1)).float().mean())    # the share that differs
