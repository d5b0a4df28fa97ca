# expect: count_call_modules\(resnet18, nn\.ReLU\) is 9: that is too small\. That is the number of ReL
def count_call_modules(gm, module_type):
    return sum(isinstance(m, module_type) for m in gm.modules())
