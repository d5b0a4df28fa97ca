# expect: '3\.relu' \(ReLU\) runs 2 times per forward: BasicBlock\.forward .*shared-ReLU trap
exercise_groups = [["0", "1", "2"], ["3.conv1", "3.bn1", "3.relu"], ["3.conv2", "3.bn2"], ["4", "5"], ["7", "8"],
                   ["11", "12"]]
