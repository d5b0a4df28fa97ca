# expect: after restore\(\), lab.Layer is Replacement, not the original class object: save getattr\(module, name\) \*before\*
def swap_class(module, name, replacement):
    setattr(module, name, replacement)
    original = getattr(module, name)          # saved too late: this is already the replacement

    def restore():
        setattr(module, name, original)

    return restore
