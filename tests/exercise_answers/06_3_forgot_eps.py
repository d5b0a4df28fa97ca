# expect: center_tap.*forget eps.*ε = 1
k3, k1, k0 = 2 / 3 ** 0.5, 1 / 3 ** 0.5, 3 / 8 ** 0.5                  # forgot eps
center_tap = 2 * k3 + 1 * k1 + 1 * k0
bias_merged = (0 - 1 * k3) + (1 - 0 * k1) + (0.5 - 2 * k0)
