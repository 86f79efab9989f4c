"""The network and its machinery: model, losses, one SGD step, the recipe's schedule, augmentation, batches,
the sliding window, checkpoints, the precision and layout probe (autotune), training progress, the v1 fork's
parameter names and pickles."""
