# expect: the amounts do not match
def absorbed_bias(beta, gamma, n_sigma):
    return (beta - n_sigma * gamma ** 2).clamp_min(0)   # the variance instead of the standard deviation
