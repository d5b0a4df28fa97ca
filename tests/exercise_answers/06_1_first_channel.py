# expect: F\.conv2d\(x, kernel, padding=2, groups=3\).*o % \(C/groups\)
def identity_kernel_grouped(channels, groups, kernel_size):
    kernel = torch.zeros(channels, channels // groups, kernel_size, kernel_size)
    kernel[:, 0, kernel_size // 2, kernel_size // 2] = 1.0                  # always the group's first channel
    return kernel
