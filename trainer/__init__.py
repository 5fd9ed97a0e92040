"""Training MiniMind-V: records and their problems, the dataset and batches, the feature cache, the loop."""
