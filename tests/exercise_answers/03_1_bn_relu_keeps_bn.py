# expect: a BatchNorm is left at '12\.0', inside a BNReLU1d: a BatchNorm\+ReLU group keeps the BatchNorm
exercise_groups = [["0", "1", "2"], ["3.conv1", "3.bn1"], ["3.conv2", "3.bn2"], ["4", "5"], ["7", "8"],
                   ["12", "13"]]
