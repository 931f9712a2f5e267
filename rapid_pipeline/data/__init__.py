"""Readers of what the pipeline writes for training: webdataset shards (`rapid_pipeline.data.loader`)."""
