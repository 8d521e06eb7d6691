"""API keys: who calls (auth), what they may see (ownership), how much they
may use (limits), and the admin routes that manage keys."""
