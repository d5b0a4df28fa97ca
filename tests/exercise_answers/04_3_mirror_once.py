# expect: the number of Conv2d calls in gm_mirror is 20: that is too small\. flipper\(x, mirror=True\) r
class MirrorOnly(nn.Module):  # only the mirrored half
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x, mirror: bool = True):
        return self.backbone(x.flip(-1))


gm_single = ffx.symbolic_trace(flipper, concrete_args={"mirror": False})
gm_mirror = ffx.symbolic_trace(MirrorOnly(flipper.backbone), concrete_args={"mirror": True})
