"""Remote storage: the backends (a local directory or S3), uploading each timeline's durable state, and
downloading timelines a fresh pageserver lacks."""
