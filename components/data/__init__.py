"""Dataset layer: label contract, readers for the real formats, Parquet shards, synthetic data."""
