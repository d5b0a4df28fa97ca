# expect: c2 \+ b2 cannot fuse.*would read BN\(z\) instead of z
expected_groups = [["c1", "b1", "r1"], ["c2", "b2"], ["c3", "b3"]]   # the addition b2(z) + z overlooked
