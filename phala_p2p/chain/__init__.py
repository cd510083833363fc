"""chain room."""
