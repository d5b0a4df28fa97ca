# expect: called twice
import torch


def clipped_share(model, x):
    seen = {}

    def counter(name):
        def count(module, args):
            seen.setdefault(name, (int((args[0] > 6).sum()), args[0].numel()))   # keeps the first call only
        return count

    handles = [m.register_forward_pre_hook(counter(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.ReLU6)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sum(a for a, _ in seen.values()) / sum(t for _, t in seen.values())
