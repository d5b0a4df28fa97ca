# expect: ex3_classifier_share is 36\.55, a percentage: give a fraction between 0 and 1
ex3_top_mobilenet = max(t_mobilenet.select("standard", "pointwise", "depthwise", "linear"), key=lambda r: r.macs).name
ex3_top_resnet = max(t_resnet.select("standard", "pointwise", "linear"), key=lambda r: r.macs).name
ex3_classifier_share = 100 * t_mobilenet.by_kind()["linear"].params_share
