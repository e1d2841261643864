"""Small, documented examples (e.g. custom router functions for `kind: custom`)."""
