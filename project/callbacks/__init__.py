"""Callbacks Lightning does not ship. Each module is one concern; import from the module itself."""
