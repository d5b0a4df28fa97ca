# expect: M0 for m=0\.0123456789 should be a Python int, got float
import math


def fixed_point(m):
    f, e = math.frexp(m)
    return f * 2**31, 31 - e          # not rounded to an integer at all
