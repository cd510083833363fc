"""tee room."""
