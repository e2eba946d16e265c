"""Async use cases over protocol rules and storage: push, pull, delete, discovery."""
