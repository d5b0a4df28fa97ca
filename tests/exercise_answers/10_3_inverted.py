# expect: correction is off.*the paper's c = sigma_B / sigma_run
correction = 2.0 / 1.6              # sigma_B / sigma_run: the paper's c, not the factor on the output
factor_when_frozen = 1.0
