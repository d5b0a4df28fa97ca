# expect: gm \(resnet18\) still calls an nn\.ReLU at the nodes .*must rewrite gm itself \(in place\)
def relu_to_relu6(gm):
    gm = copy.deepcopy(gm)
    modules = dict(gm.named_modules())
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(modules[node.target]) is nn.ReLU:
            gm.add_submodule(f"{node.name}_relu6", nn.ReLU6())
            node.target = f"{node.name}_relu6"
            changed += 1
    gm.delete_all_unused_submodules()
    gm.recompile()
    return changed
