"""Data preparation: intensity and geometry transforms, resampling, the preprocessed case store, synthetic CT."""
