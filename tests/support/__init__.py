"""Helpers shared by tests: processes the tests start (HAProxy, ...)."""
