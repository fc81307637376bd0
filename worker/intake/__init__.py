"""Where a watch enters: validation of producers' messages at the Celery boundary."""
