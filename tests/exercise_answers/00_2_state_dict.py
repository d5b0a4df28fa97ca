# expect: n_mobilenet_params is 2270846: that is too large\. That counts the state_dic
model = models.build("mobilenet_v2", num_classes=10)
n_mobilenet_params = sum(t.numel() for t in model.state_dict().values())
