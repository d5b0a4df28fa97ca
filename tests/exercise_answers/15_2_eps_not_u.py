# expect: u = 2\^-\(t\+1\), not 2\^-t
def gate_tolerance(depth, fraction_bits):
    u = 2.0 ** -fraction_bits                                             # machine epsilon, twice the unit roundoff
    return (1 + u) ** depth - 1


fp16_gate = gate_tolerance(21, 10)
