# expect: factor_when_frozen is off.*sigma_run itself
correction = 1.6 / 2.0
factor_when_frozen = 0.0
