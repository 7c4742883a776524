"""Celery workers that run the prompt optimizer, one engine replica per worker process, a queue per model."""
