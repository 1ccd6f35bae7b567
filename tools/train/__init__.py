"""Training of the shipped digits models and their metrics' classifier (``python -m keystep.tools.train.dit`` ...)."""
