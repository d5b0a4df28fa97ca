# expect: \['bn_in'\] is x \(a Node\): it should be a string naming what produces.*containing 'x'
def unfoldable_batchnorms(gm):
    modules = dict(gm.named_modules())
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        producer = node.args[0]
        if not (producer.op == "call_module" and isinstance(modules[producer.target], nn.Conv2d)
                and len(producer.users) == 1):
            found[node.target] = producer          # the Node itself, not a name
    return found
