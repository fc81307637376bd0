"""Asking Check365: the bulk-status client, when to poll next, the pool-wide rate limit, the poll step."""
