"""Durable state in Redis: watches, webhook events and the protocol they share."""
