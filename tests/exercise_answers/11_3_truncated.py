# expect: M0 for m=0\.0123456789 is not the nearest integer to m \* 2\^n: round, do not truncate
import math


def fixed_point(m):
    f, e = math.frexp(m)
    return int(f * 2**31), 31 - e     # int() truncates
