"""The engine: layers (each answers everything about itself), networks, workspaces,
optimizers and threads. It imports only common/ (tests/test_imports.py keeps it so)."""
