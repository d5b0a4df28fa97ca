# expect: correction is off: it is too small.*in front of conv
correction = 2.0 - 1.6              # a difference of the two standard deviations, not their ratio
factor_when_frozen = 1.0
