"""Fault and bad-input suites: a Jepsen-style checker over the real services."""
