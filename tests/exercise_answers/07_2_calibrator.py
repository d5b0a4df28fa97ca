# expect: calls fusionlib\.quant\..*compute the per-channel amax yourself
def fake_quant_per_channel(weight, num_bits, axis=0):
    calibrator = quant.MaxCalibrator(num_bits, axis=axis)             # the library computes the amax
    calibrator.collect(weight)
    return quant.fake_quantize(weight, calibrator.compute_amax(), num_bits)
