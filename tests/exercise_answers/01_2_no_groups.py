# expect: make_separable\(16, 32, 3\) holds convs of kind \['standard', 'pointwise'\], expected \['depthwise', 'pointwise'\]: the first conv needs groups=c_in
def make_separable(c_in, c_out, k):
    return nn.Sequential(nn.Conv2d(c_in, c_in, k, padding=k // 2, bias=False),
                         nn.Conv2d(c_in, c_out, 1, bias=False))
