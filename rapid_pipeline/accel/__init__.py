"""Acceleration: attention backends, compilers (torch.compile / AOTInductor / BladeDISC), precision,
and the cached, parity-checked artifacts serving loads (`rapid compile`, `artifact.load_optimized`)."""
