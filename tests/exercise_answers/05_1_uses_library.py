# expect: unfoldable_batchnorms uses \['fuse_conv_bn', 'fusion_report', 'skipped'\].*read the graph yourself
def unfoldable_batchnorms(gm):
    report = ffx.fuse_conv_bn(gm).fusion_report
    return {s.bn: s.detail for s in report.skipped}
