# expect: relu_to_relu6\(resnet18\)'s return value is 9: that is too small\. That is the number of ReL
def relu_to_relu6(gm):
    swapped = 0
    for name, module in list(gm.named_modules()):
        if type(module) is nn.ReLU:               # swap the modules: every node calling them now runs a ReLU6
            parent, _, attribute = name.rpartition(".")
            setattr(gm.get_submodule(parent), attribute, nn.ReLU6())
            swapped += 1
    return swapped
