# expect: center_tap.*identity branch is a BN too
k3, k1 = 2 / (3 + 1) ** 0.5, 1 / (3 + 1) ** 0.5
center_tap = 2 * k3 + 1 * k1                                            # the identity branch forgotten
bias_merged = (0 - 1 * k3) + (1 - 0 * k1)
