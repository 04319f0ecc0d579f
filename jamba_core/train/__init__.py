"""Training the small Jamba that ships with the repository (`python -m jamba_core.train`)."""
