"""Configuration of check365-worker: settings from the environment, Celery and logging."""
