"""The network and its training and inference machinery: model, losses, step, augmentation, batches, sliding window, checkpoints, autotune."""
