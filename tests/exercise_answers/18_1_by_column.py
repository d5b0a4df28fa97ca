# expect: argmax runs over the wrong dimension
def agreement(a, b):
    return float((a.argmax(dim=0) == b.argmax(dim=0)).float().mean())    # the top row per class, not the class per row
