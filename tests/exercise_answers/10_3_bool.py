# expect: factor_when_frozen is a bool
correction = 1.6 / 2.0
factor_when_frozen = True                                         # "yes, it is one" -- a bool, not the factor
