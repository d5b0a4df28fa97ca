# expect: gm_single flips its input: it was traced with mirror=True
gm_single = ffx.symbolic_trace(flipper, concrete_args={"mirror": True})
gm_mirror = ffx.symbolic_trace(flipper, concrete_args={"mirror": False})
