# expect: share is 0.*pre-hook
import torch


def clipped_share(model, x):
    counts = [0, 0]

    def count(module, args, output):               # after the module ran: an in-place ReLU6 has clipped args[0]
        counts[0] += int((args[0] > 6).sum())
        counts[1] += args[0].numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.ReLU6)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return counts[0] / counts[1]
