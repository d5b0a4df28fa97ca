# expect: count_call_modules\(resnet18, nn\.Conv2d\) is 17: that is too small\. Count the nodes with node
def count_call_modules(gm, module_type):
    kind = module_type.__name__.lower().replace("2d", "")
    return sum(1 for node in gm.graph.nodes if node.op == "call_module" and node.name.split("_")[-1].startswith(kind))
