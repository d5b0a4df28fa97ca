# expect: M0 for m=0\.0123456789 is too small: it should use all 31 bits
import math


def fixed_point(m):
    f, e = math.frexp(m)
    return round(f * 2**30), 30 - e   # a 30-bit mantissa
