"""Callbacks Lightning does not ship."""
