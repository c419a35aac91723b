"""proctor terminal UI and command line."""
