"""/v1/usage: token usage per key, model, endpoint and day."""
