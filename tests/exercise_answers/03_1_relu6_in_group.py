# expect: group \['4', '5', '6'\] has the types \(Conv2d, BatchNorm2d, ReLU6\).*ReLU6 is not ReLU
exercise_groups = [["0", "1", "2"], ["3.conv1", "3.bn1"], ["3.conv2", "3.bn2"], ["4", "5", "6"], ["7", "8"],
                   ["11", "12"]]
