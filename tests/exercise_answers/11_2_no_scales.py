# expect: int8_bytes is too small: the bias and the scales
fp32_bytes = 4 * 64 * 64 * 3 * 3 + 4 * 64
int8_bytes = 64 * 64 * 3 * 3 + 4 * 64
