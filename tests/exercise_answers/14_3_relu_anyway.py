# expect: b3's output w is also read by w.mean\(\)
expected_groups = [["c1", "b1", "r1"], ["c3", "b3", "r3"]]   # the ReLU taken although w is read again
