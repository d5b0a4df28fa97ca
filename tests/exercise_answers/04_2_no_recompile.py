# expect: gm\.code is not the code of gm\.graph: .*gm\.recompile\(\) was not called.*classic fx bug
def relu_to_relu6(gm):
    modules = dict(gm.named_modules())
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(modules[node.target]) is nn.ReLU:
            gm.add_submodule(f"{node.name}_relu6", nn.ReLU6())
            node.target = f"{node.name}_relu6"
            changed += 1
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    return changed
