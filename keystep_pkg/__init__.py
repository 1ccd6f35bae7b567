"""keystep: a deployment compiler for diffusion models."""
