"""Training stages: `rapid train clip|diffusion|sr` and their shared utilities (`common`)."""
