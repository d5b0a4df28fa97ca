# expect: int8_bytes is .*expected.*one fp32 scale per output channel
fp32_bytes = 4 * 64 * 64 * 3 * 3 + 4 * 64
int8_bytes = 64 * 64 * 3 * 3 + 4 * 64
