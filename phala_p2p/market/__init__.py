"""market room."""
