# expect: mean of the per-module shares
import torch


def clipped_share(model, x):
    per_module = {}

    def counter(name):
        def count(module, args):
            above, total = per_module.get(name, (0, 0))
            per_module[name] = (above + int((args[0] > 6).sum()), total + args[0].numel())
        return count

    handles = [m.register_forward_pre_hook(counter(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.ReLU6)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sum(a / t for a, t in per_module.values()) / len(per_module)   # every module weighs the same
