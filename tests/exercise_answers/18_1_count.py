# expect: outside \[0, 1\]
def agreement(a, b):
    return int((a.argmax(dim=1) == b.argmax(dim=1)).sum())               # how many rows agree, not the share
