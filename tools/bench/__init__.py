"""Benchmarks: ``python -m keystep.tools.bench`` (the side-by-side table) and one module per focused benchmark
(``bench.dit``, ``bench.unet``, ``bench.dydit``, ``bench.precision``, ``bench.gpu_check``)."""
