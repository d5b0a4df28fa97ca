# expect: misses 1 BatchNorm.*'block\.bn'.*2 node\(s\) read.*second reader|another reader
def unfoldable_batchnorms(gm):
    modules = dict(gm.named_modules())
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        producer = node.args[0]
        if not (producer.op == "call_module" and isinstance(modules[producer.target], nn.Conv2d)):
            target = producer.target
            found[node.target] = target if isinstance(target, str) else target.__name__
    return found
