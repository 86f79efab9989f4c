"""Data preparation: intensity and geometry transforms, resampling, the preprocessed case store, the checks
01_convert makes, synthetic CT (anatomy and the MSD task writer)."""
