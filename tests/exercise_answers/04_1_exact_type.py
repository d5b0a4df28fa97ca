# expect: count_call_modules\(resnet18, _BatchNorm\) is 0: that is too small\. Instances of a subclass c
def count_call_modules(gm, module_type):
    modules = dict(gm.named_modules())
    return sum(1 for node in gm.graph.nodes if node.op == "call_module" and type(modules[node.target]) is module_type)
