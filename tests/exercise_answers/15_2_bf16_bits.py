# expect: fp16_gate.*fp16 has 10 stored fraction bits
def gate_tolerance(depth, fraction_bits):
    u = 2.0 ** -(fraction_bits + 1)
    return (1 + u) ** depth - 1


fp16_gate = gate_tolerance(21, 7)                                         # bf16's fraction bits
