"""Telling the receiver: webhook events, signing, callback URL rules, the delivery step."""
