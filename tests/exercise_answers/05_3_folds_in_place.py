# expect: the conv 'blocks\.0\.conv' was replaced by the folded one: its other reader, the skip connection
def fold_by_duplicating(model):
    # section 3's pass without the one-reader check: the conv itself is folded
    gm = fx.symbolic_trace(copy.deepcopy(model))
    modules = dict(gm.named_modules())
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module" or type(modules[bn_node.target]) is not nn.BatchNorm2d:
            continue
        conv_node = bn_node.args[0]
        if not (conv_node.op == "call_module" and type(modules[conv_node.target]) is nn.Conv2d
                and len(conv_node.users) > 1):
            continue
        gm.set_submodule(conv_node.target,
                         fusion.fuse_conv_bn_eval(modules[conv_node.target], modules[bn_node.target]))
        bn_node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(bn_node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
