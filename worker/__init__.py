"""The product around the detector: Celery app, thin tasks, the pipeline, fetch/decode, webhooks, CLI."""
