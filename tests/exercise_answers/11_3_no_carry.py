# expect: M0 for m=0\.99999\d* is too large: it must fit 31 bits.*halve it and take n one smaller
import math


def fixed_point(m):
    f, e = math.frexp(m)
    return round(f * 2**31), 31 - e   # forgets that rounding can reach 2**31
