"""Command line: parse arguments, build settings, call the API."""
