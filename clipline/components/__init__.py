"""Pure library code for each stage. Nothing here imports prefect."""
