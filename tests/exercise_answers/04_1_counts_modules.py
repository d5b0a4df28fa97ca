# expect: count_call_modules\(resnet18, nn\.ReLU\) is 9 \(-8\), expected 17\. That is the number of ReLU modules
def count_call_modules(gm, module_type):
    return sum(isinstance(m, module_type) for m in gm.modules())
