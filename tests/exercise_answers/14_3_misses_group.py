# expect: misses 1 group
expected_groups = [["c1", "b1", "r1"]]   # c3 + b3 given up because b3's output is read twice
