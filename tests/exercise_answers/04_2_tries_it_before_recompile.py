# expect: your code raised AttributeError: 'ResNet' object has no attribute 'relu'.*Hint: gm.forward still runs the code generated before your edit.*Call gm\.recompile\(\).*classic fx bug
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
    with torch.no_grad():                      # try the new graph... which forward has not been regenerated
        gm(torch.zeros(1, 3, image_size, image_size))
    gm.recompile()
    return changed
