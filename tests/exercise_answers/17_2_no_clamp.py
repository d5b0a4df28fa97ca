# expect: some amounts are negative
def absorbed_bias(beta, gamma, n_sigma):
    return beta - n_sigma * gamma.abs()
