# expect: Every one of the depth layers rounds once
def gate_tolerance(depth, fraction_bits):
    u = 2.0 ** -(fraction_bits + 1)
    return (1 + u) ** (depth - 1) - 1                                     # the first layer forgotten


fp16_gate = gate_tolerance(21, 10)
