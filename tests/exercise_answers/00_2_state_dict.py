# expect: n_mobilenet_params is 2270846 .*expected 2236682\. That counts the state_dict, which includes BatchNorm's running_mean
model = models.build("mobilenet_v2", num_classes=10)
n_mobilenet_params = sum(t.numel() for t in model.state_dict().values())
