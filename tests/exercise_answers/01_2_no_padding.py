# expect: make_separable\(16, 32, 3\)\(x\)\.shape for x of shape \(2, 16, 11, 11\) is \(2, 32, 9, 9\): wrong at position
def make_separable(c_in, c_out, k):
    return nn.Sequential(nn.Conv2d(c_in, c_in, k, groups=c_in, bias=False),
                         nn.Conv2d(c_in, c_out, 1, bias=False))
