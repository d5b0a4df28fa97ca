# expect: M0 \* 2\^-n for m=0\.0123456789 is too large
import math


def fixed_point(m):
    f, e = math.frexp(m)
    return round(f * 2**31), 30 - e   # n one too small: M0 * 2^-n is twice m
