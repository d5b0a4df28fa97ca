# expect: int8_bytes is too large: int8 weights take one byte each
fp32_bytes = 4 * 64 * 64 * 3 * 3 + 4 * 64
int8_bytes = 4 * 64 * 64 * 3 * 3 + 4 * 64 + 4 * 64   # weights still counted at 4 bytes
