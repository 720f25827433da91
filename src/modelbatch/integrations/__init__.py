"""Integrations with training frameworks; each module imports its own framework."""
