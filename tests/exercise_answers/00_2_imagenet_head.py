# expect: n_mobilenet_params is 3504872: that is too large\. That is the 1000\-class Im
n_mobilenet_params = sum(p.numel() for p in models.build("mobilenet_v2", num_classes=1000).parameters())
