"""One module per op: kernels, launcher, torch.library registration, autograd."""
