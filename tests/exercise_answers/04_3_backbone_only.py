# expect: gm_single has no mirror argument .*Trace flipper itself, with concrete_args=\{'mirror': False\}, not its backbone
gm_single = ffx.symbolic_trace(flipper.backbone)
gm_mirror = ffx.symbolic_trace(flipper, concrete_args={"mirror": True})
