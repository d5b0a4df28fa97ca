# expect: fp32_bytes is too small: count the 64 biases
fp32_bytes = 4 * 64 * 64 * 3 * 3
int8_bytes = 64 * 64 * 3 * 3 + 4 * 64 + 4 * 64
