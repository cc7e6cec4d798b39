"""The typer command line: a thin layer that builds configs from flags and calls the library."""
