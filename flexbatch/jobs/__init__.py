"""The batch-job runner: input formats, bucketing, durable resumable output."""
