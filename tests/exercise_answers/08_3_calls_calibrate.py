# expect: your answer calls fusionlib\.quant\.ptq\.calibrate: drive each quantizer's calibration yourself
def calibrate_max(model, batches):
    return quant.calibrate(model, batches, "max")             # the shortcut the prompt rules out
