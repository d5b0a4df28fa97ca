# expect: ex3_top_mobilenet is 'classifier\.1', which is not right\. 'classifier\.1' has the mo
ex3_top_mobilenet = max(t_mobilenet.select("standard", "pointwise", "depthwise", "linear"), key=lambda r: r.params).name
ex3_top_resnet = max(t_resnet.select("standard", "pointwise", "linear"), key=lambda r: r.params).name
ex3_classifier_share = t_mobilenet.by_kind()["linear"].params_share
