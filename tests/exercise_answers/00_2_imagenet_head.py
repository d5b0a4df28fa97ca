# expect: n_mobilenet_params is 3504872 .*build it with num_classes=10
n_mobilenet_params = sum(p.numel() for p in models.build("mobilenet_v2", num_classes=1000).parameters())
