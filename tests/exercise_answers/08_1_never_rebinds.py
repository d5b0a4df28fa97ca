# expect: after swap_class, lab.Layer is Layer, not the replacement: rebind it with setattr
def swap_class(module, name, replacement):
    original = getattr(module, name)
    swapped = replacement                     # rebinds a local name, not the module's attribute

    def restore():
        setattr(module, name, original)

    return restore
