# expect: make_separable\(16, 32, 3\): conv\(s\) \['0', '1'\] have a bias; pass bias=False to both
def make_separable(c_in, c_out, k):
    return nn.Sequential(nn.Conv2d(c_in, c_in, k, padding="same", groups=c_in),
                         nn.Conv2d(c_in, c_out, 1))
