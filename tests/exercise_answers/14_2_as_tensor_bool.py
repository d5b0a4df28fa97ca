# expect: corner_error is of type bool
corner_error = True         # "yes, the corner errs"
edge_error = True
