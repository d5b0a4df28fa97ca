# expect: 5 modules absorbed .*7 are possible\. Still separate, but each could join the group of the module before it: \['2', '8'\]
exercise_groups = [["0", "1"], ["3.conv1", "3.bn1"], ["3.conv2", "3.bn2"], ["4", "5"], ["11", "12"]]
