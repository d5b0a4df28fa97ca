# expect: ex3_classifier_share is 0\.004163, the classifier's share of the MACs: give its share of the parameters
ex3_top_mobilenet = max(t_mobilenet.select("standard", "pointwise", "depthwise", "linear"), key=lambda r: r.macs).name
ex3_top_resnet = max(t_resnet.select("standard", "pointwise", "linear"), key=lambda r: r.macs).name
ex3_classifier_share = t_mobilenet.by_kind()["linear"].macs_share
