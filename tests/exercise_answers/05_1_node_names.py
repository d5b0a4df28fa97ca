# expect: keys such as 'bn_in'|keys such as '.*_.*': that is the node's name\. Use node\.target
def unfoldable_batchnorms(gm):
    modules = dict(gm.named_modules())
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        producer = node.args[0]
        if not (producer.op == "call_module" and isinstance(modules[producer.target], nn.Conv2d)
                and len(producer.users) == 1):
            found[node.name] = producer.name
    return found
