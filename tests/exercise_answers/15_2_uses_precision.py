# expect: calls fusionlib.precision.unit_roundoff.*without fusionlib.precision
def gate_tolerance(depth, fraction_bits):
    dtype = {7: torch.bfloat16, 10: torch.float16, 23: torch.float32}[fraction_bits]
    return (1 + precision.unit_roundoff(dtype)) ** depth - 1             # the rule says: compute u yourself


fp16_gate = gate_tolerance(21, 10)
