# expect: b_folded is off: .*it needs both the conv's bias b = 0\.5 and BN's β = 1
k = 4 / math.sqrt(3 + 1)
w_folded = [1.5 * k, -0.25 * k]
b_folded = (0 - 2) * k + 1
