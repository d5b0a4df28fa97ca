# expect: b_folded is too large\. b' = \(b − μ\)·k \+ β: it ne
k = 4 / math.sqrt(3 + 1)
w_folded = [1.5 * k, -0.25 * k]
b_folded = (0 - 2) * k + 1
