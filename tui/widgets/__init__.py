"""The widgets and views of the proctor app."""
