# expect: raised KeyError.*Hint: dict\(gm\.named_modules\(\)\) holds module names only.*node\.op == 'call_module'
def unfoldable_batchnorms(gm):
    modules = dict(gm.named_modules())
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d):
            producer = node.args[0]
            if not isinstance(modules[producer.target], nn.Conv2d) or len(producer.users) > 1:
                found[node.target] = str(producer.target)
    return found
