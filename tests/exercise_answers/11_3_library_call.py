# expect: your answer calls fusionlib\.quant\.integer\.fixed_point_multiplier
from fusionlib.quant import integer


def fixed_point(m):
    return integer.fixed_point_multiplier(m)
