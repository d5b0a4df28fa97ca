# expect: your answer calls fusionlib\.quant\.ptq\.keep_float: disable the quantizers yourself
def keep_in_float(model, layer_names):
    quant.keep_float(model, layer_names)                      # the shortcut the prompt rules out
