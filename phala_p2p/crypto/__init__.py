"""crypto room."""
