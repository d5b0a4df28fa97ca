# expect: wrong where γ < 0
def absorbed_bias(beta, gamma, n_sigma):
    return (beta - n_sigma * gamma).clamp_min(0)
