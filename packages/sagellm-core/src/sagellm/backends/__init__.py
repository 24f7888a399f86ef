"""Reusable building blocks for backends, and the built-in CPU backend."""
