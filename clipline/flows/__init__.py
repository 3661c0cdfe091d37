"""Thin Prefect flows over the components, and the command line."""
