"""tools/bench/openvino_ops: the per-product view that docs/benchmarks.md ("Width profiles under bf16") reads."""

import collections

import openvino

from keystep.runtime.bundle import Bundle
from keystep.tools.bench.openvino_ops import main, profile_stage

# TINY_CFG (tests/dit_reference.py): 8x8 latent in 2x2 patches = 16 tokens, hidden 64, 4 heads, MLP ratio 4
TOKENS, HIDDEN, MLP = 16, 64, 256


def test_products_are_the_blocks_linear_layers_with_their_shapes(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    blocks = bundle.manifest["split"]  # the encoder runs the first `split` blocks
    result = profile_stage(openvino.Core(), bundle.stage("encoder"), "f32", batch=2, runs=2)
    shapes = collections.Counter(shape for _, shape, _ in result["products"])
    rows = 2 * TOKENS
    # per block, as DiT defines them: qkv, attention out-projection, fc1, fc2 on every token, adaLN on each row
    for product in [(rows, HIDDEN, 3 * HIDDEN), (rows, HIDDEN, HIDDEN), (rows, HIDDEN, MLP), (rows, MLP, HIDDEN),
                    (2, HIDDEN, 6 * HIDDEN)]:
        assert shapes[product] == blocks, (product, shapes)
    assert all(ms > 0 for _, _, ms in result["products"])


def test_products_command_prints_one_line_per_product(tiny_bundle, capsys):
    assert main([str(tiny_bundle), "encoder", "--precision", "f32", "--runs", "1", "--products"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "GFLOP/s" in line and " -> " in line]
    assert len(lines) >= 5 * Bundle.load(tiny_bundle).manifest["split"]
