# expect: w_folded is off: .*Did you forget eps\? k = γ/√\(σ² \+ ε\) with ε = 1
k = 4 / math.sqrt(3)
w_folded = [1.5 * k, -0.25 * k]
b_folded = (0.5 - 2) * k + 1
