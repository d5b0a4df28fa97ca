# expect: wrong order: list them in module order
expected_groups = [["c3", "b3"], ["c1", "b1", "r1"]]
