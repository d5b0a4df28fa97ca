# expect: BatchNorm\(s\) left at \['3\.bn1', '3\.bn2'\]: they are in no group
exercise_groups = [["0", "1", "2"], ["4", "5"], ["7", "8"], ["11", "12"]]
