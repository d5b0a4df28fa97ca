# expect: identity_kernel_grouped\(6, 3, 5\)\.shape is \(6, 6, 5, 5\).*C/groups
def identity_kernel_grouped(channels, groups, kernel_size):
    kernel = torch.zeros(channels, channels, kernel_size, kernel_size)     # ignores groups: a dense kernel
    kernel[range(channels), range(channels), kernel_size // 2, kernel_size // 2] = 1.0
    return kernel
