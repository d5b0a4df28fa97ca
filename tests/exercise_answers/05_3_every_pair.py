# expect: the stem's BatchNorm 'stem\.1' is no longer called: its conv 'stem\.0' has one reader
def fold_by_duplicating(model):
    gm = fx.symbolic_trace(copy.deepcopy(model))
    modules = dict(gm.named_modules())
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module" or type(modules[bn_node.target]) is not nn.BatchNorm2d:
            continue
        conv_node = bn_node.args[0]
        if not (conv_node.op == "call_module" and type(modules[conv_node.target]) is nn.Conv2d):
            continue                            # every Conv2d -> BatchNorm2d pair, one reader or more
        new_name = conv_node.target.replace(".", "_") + "_folded"
        gm.add_submodule(new_name, fusion.fuse_conv_bn_eval(modules[conv_node.target], modules[bn_node.target]))
        with gm.graph.inserting_after(conv_node):
            folded_node = gm.graph.call_module(new_name, conv_node.args, conv_node.kwargs)
        bn_node.replace_all_uses_with(folded_node)
        gm.graph.erase_node(bn_node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
