# expect: group \['11', '12', '13'\] has the types \(Linear, BatchNorm1d, ReLU\).*Without its last module, \(Linear, BatchNorm1d\) is supported
exercise_groups = [["0", "1", "2"], ["3.conv1", "3.bn1"], ["3.conv2", "3.bn2"], ["4", "5"], ["7", "8"],
                   ["11", "12", "13"]]
