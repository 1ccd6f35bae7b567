"""Tests for keystep.graphs.flops (ONNX FLOP counting).

Models are exported with the torch dynamo exporter (``dynamo=True`` +
``dynamic_shapes``), which is the default and works in torch 2.13 with a dynamic batch
axis (~3 s per export, ~6 s for the first one in a process); the legacy TorchScript
exporter (fast) is used for convs / attention and where it adds coverage (local functions via
``export_modules_as_functions``, shape arithmetic of nn.MultiheadAttention).  MAC parts
are compared exactly to hand-written analytic formulas.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from keystep.graphs.flops import FlopReport, LinearFlops, count_flops, flops_per_sample  # noqa: E402

torch.manual_seed(0)


# --------------------------------------------------------------------------- helpers

def _export_dynamo(module, example, path, opset=20):
    """Dynamo export with a dynamic batch axis on input "x" (dim 0)."""
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(path), dynamo=True, opset_version=opset,
            input_names=["x"], dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=True,  # default; exercises load_external_data=False
        )
    return str(path)


def _export_legacy(module, example, path, **kw):
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}}, opset_version=18, **kw)
    return str(path)


def _conv_out(n, k, s, p, d=1):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _convT_out(n, k, s, p, op=0):
    return (n - 1) * s - 2 * p + k + op


def _model(nodes, inputs, outputs, inits=(), opset=None):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    kw = {} if opset is None else {"opset_imports": [helper.make_opsetid("", opset)]}
    return helper.make_model(g, **kw)


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _w(name, *shape):
    return numpy_helper.from_array(np.zeros(shape, np.float32), name)


# --------------------------------------------------------------------------- modules

class LinearStack(nn.Module):
    dims = (16, 32, 64, 8)

    def __init__(self):
        super().__init__()
        d = self.dims
        self.l1, self.l2, self.l3 = nn.Linear(d[0], d[1]), nn.Linear(d[1], d[2]), nn.Linear(d[2], d[3])

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4)
        self.c2 = nn.Conv2d(16, 24, (3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1),
                            groups=8, bias=False)
        self.ct = nn.ConvTranspose2d(24, 6, 4, stride=2, padding=1, groups=3)

    def forward(self, x):
        return self.ct(torch.relu(self.c2(self.c1(x))))


class AttnLike(nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        self.h, self.dh = h, d // h
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.reshape(b, s, self.h, self.dh).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) * self.dh ** -0.5, dim=-1)
        return self.out((a @ v).transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-LN transformer block with nn.MultiheadAttention and a GELU MLP."""

    def __init__(self, d=32, h=4, ff=4):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = nn.MultiheadAttention(d, h, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, ff * d), nn.GELU(), nn.Linear(ff * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.att(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tmpdir_mod(tmp_path_factory):
    return tmp_path_factory.mktemp("flops")


@pytest.fixture(scope="module")
def linear_onnx(tmpdir_mod):
    return _export_dynamo(LinearStack(), torch.randn(2, 16), tmpdir_mod / "linear.onnx")


@pytest.fixture(scope="module")
def conv_onnx(tmpdir_mod):
    # legacy: emits the same single Conv / ConvTranspose nodes as dynamo, ~2 s faster
    return _export_legacy(ConvNet(), torch.randn(2, 8, 17, 19), tmpdir_mod / "conv.onnx")


@pytest.fixture(scope="module")
def attn_onnx(tmpdir_mod):
    # legacy exporter: ~0.05 s vs ~3 s for a dynamo export (keeps the file fast); the
    # dynamo path is covered by the transformer block, which has the same q @ k^T pattern
    return _export_legacy(AttnLike(), torch.randn(2, 10, 32), tmpdir_mod / "attn.onnx")


@pytest.fixture(scope="module")
def block_onnx(tmpdir_mod):
    return _export_dynamo(Block(), torch.randn(2, 10, 32), tmpdir_mod / "block.onnx")


# --------------------------------------------------------------------------- analytic

def linear_macs(b):
    d = LinearStack.dims
    return b * sum(d[i] * d[i + 1] for i in range(len(d) - 1))


def conv_macs(b, h, w):
    h1, w1 = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
    m1 = b * 16 * h1 * w1 * (8 // 4) * 3 * 3
    h2, w2 = _conv_out(h1, 3, 1, 2, 2), _conv_out(w1, 5, 2, 1, 1)
    m2 = b * 24 * h2 * w2 * (16 // 8) * 3 * 5
    m3 = b * 24 * h2 * w2 * (6 // 3) * 4 * 4  # ConvTranspose: per *input* element
    h3, w3 = _convT_out(h2, 4, 2, 1), _convT_out(w2, 4, 2, 1)
    return m1 + m2 + m3, (b * 16 * h1 * w1, b * 6 * h3 * w3)


def attn_macs(b, s, d=32, h=4):
    proj = b * s * d * 3 * d + b * s * d * d  # qkv + out
    core = 2 * b * h * s * s * (d // h)  # q @ k^T and a @ v
    return proj + core


def block_macs(b, s, d=32, ff=4):
    return attn_macs(b, s, d) + 2 * b * s * d * ff * d


# --------------------------------------------------------------------------- tests: torch exports

def test_linear_stack(linear_onnx):
    assert os.path.exists(linear_onnx + ".data")  # dynamo writes external data by default
    for b in (1, 3, 7):
        rep = count_flops(linear_onnx, {"x": (b, 16)})
        assert isinstance(rep, FlopReport)
        assert rep.matmul_conv == 2 * linear_macs(b)
        mac_ops = {k: v for k, v in rep.by_op_type.items() if k in ("Gemm", "MatMul")}
        bias = b * sum(LinearStack.dims[1:])
        assert sum(mac_ops.values()) + rep.by_op_type.get("Add", 0) == 2 * linear_macs(b) + bias
        assert rep.by_op_type["Relu"] == b * (32 + 64)
        assert rep.total == sum(rep.by_op_type.values())
        d = rep.to_dict()
        assert d["total"] == rep.total and d["matmul_conv"] == rep.matmul_conv
        assert d["by_op_type"] == rep.by_op_type


def test_weights_not_needed(linear_onnx, tmpdir_mod):
    """Counting works from the .onnx alone (external weights never read)."""
    import shutil

    lonely = tmpdir_mod / "lonely"
    lonely.mkdir()
    shutil.copy(linear_onnx, lonely / "linear.onnx")  # no .data next to it
    rep = count_flops(lonely / "linear.onnx", {"x": (5, 16)})
    assert rep.matmul_conv == 2 * linear_macs(5)
    # an in-memory ModelProto is accepted too
    rep2 = count_flops(onnx.load(linear_onnx, load_external_data=False), {"x": (5, 16)})
    assert rep2.to_dict() == rep.to_dict()


def test_conv_groups_stride_padding(conv_onnx):
    for b, h, w in ((1, 17, 19), (4, 17, 19)):
        rep = count_flops(conv_onnx, {"x": (b, 8, h, w)})
        macs, (bias1, bias3) = conv_macs(b, h, w)
        assert rep.matmul_conv == 2 * macs
        # c1 and ct have biases (1 FLOP / output element), c2 has none
        assert rep.by_op_type["Conv"] + rep.by_op_type["ConvTranspose"] == 2 * macs + bias1 + bias3


def test_attention_matmuls(attn_onnx):
    for b, s in ((1, 10), (3, 10)):
        rep = count_flops(attn_onnx, {"x": (b, s, 32)})
        assert rep.matmul_conv == 2 * attn_macs(b, s)
        assert rep.by_op_type["Softmax"] == 5 * b * 4 * s * s


def test_transformer_block(block_onnx):
    rep = count_flops(block_onnx, {"x": (2, 10, 32)})
    assert rep.matmul_conv == 2 * block_macs(2, 10)
    assert rep.by_op_type["LayerNormalization"] == 5 * 2 * (2 * 10 * 32)
    assert rep.by_op_type["Gelu"] == 8 * 2 * 10 * 128
    assert rep.by_op_type["Softmax"] == 5 * 2 * 4 * 10 * 10
    assert not rep.uncounted


def test_legacy_block_shape_folding(tmpdir_mod):
    """Legacy-exported nn.MultiheadAttention computes head_dim via Div/Cast on shapes,
    which onnx data propagation leaves symbolic; the folding fallback resolves it."""
    path = _export_legacy(Block(), torch.randn(2, 10, 32), tmpdir_mod / "block_legacy.onnx")
    rep = count_flops(path, {"x": (3, 10, 32)})
    assert rep.matmul_conv == 2 * block_macs(3, 10)


def test_local_functions_are_inlined(tmpdir_mod):
    path = _export_legacy(LinearStack(), torch.randn(2, 16), tmpdir_mod / "fn.onnx",
                          export_modules_as_functions={nn.Linear})
    m = onnx.load(path)
    assert len(m.functions) > 0 and all(n.op_type != "Gemm" for n in m.graph.node)
    rep = count_flops(path, {"x": (3, 16)})
    assert rep.matmul_conv == 2 * linear_macs(3)
    assert "Gemm" in rep.by_op_type


# --------------------------------------------------------------------------- batch linearity

def test_flops_per_sample(linear_onnx, conv_onnx, block_onnx):
    lin = flops_per_sample(linear_onnx, lambda b: {"x": (b, 16)})
    assert isinstance(lin, LinearFlops)
    assert lin.constant == 0
    assert lin.per_sample == count_flops(linear_onnx, {"x": (1, 16)}).total
    for path, shape in ((conv_onnx, (8, 17, 19)), (block_onnx, (10, 32))):
        lin = flops_per_sample(path, lambda b: {"x": (b, *shape)})
        for b in (3, 6):
            assert lin.at(b) == count_flops(path, {"x": (b, *shape)}).total
    assert lin.to_dict() == {"per_sample": lin.per_sample, "constant": lin.constant}


def test_flops_per_sample_constant_part():
    # y = x @ W (batch-dependent) ; t_emb = t @ V (fixed shape, batch-independent)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm_x"),
             helper.make_node("MatMul", ["t", "V"], ["e"], name="mm_t")]
    m = _model(nodes, [_vi("x", ["batch", 4, 6]), _vi("t", [1, 8])],
               [_vi("y", None), _vi("e", None)], [_w("W", 6, 5), _w("V", 8, 8)])
    lin = flops_per_sample(m, lambda b: {"x": (b, 4, 6)})
    assert lin == LinearFlops(per_sample=2 * 4 * 6 * 5, constant=2 * 8 * 8)
    assert lin.at(10) == count_flops(m, {"x": (10, 4, 6)}).total


# --------------------------------------------------------------------------- hand-built graphs

def test_matmul_broadcast_gemm_einsum_attention():
    nodes = [
        helper.make_node("MatMul", ["a", "b"], ["ab"], name="bcast"),       # [2,1,5,6]@[3,6,7]
        helper.make_node("MatMul", ["v", "b"], ["vb"], name="vec"),         # [6]@[3,6,7]
        helper.make_node("Gemm", ["ga", "gb", "gc"], ["gy"], name="gemm", transA=1),
        helper.make_node("Einsum", ["e1", "e2"], ["ey"], name="ein", equation="bij,bjk->bik"),
        helper.make_node("Einsum", ["e3", "e4"], ["ey2"], name="ein_ell",
                         equation="...ij,jk->...ik"),
        helper.make_node("Attention", ["q", "k", "vv"], ["att"], name="sdpa"),
    ]
    m = _model(
        nodes,
        [_vi("a", [2, 1, 5, 6]), _vi("v", [6]), _vi("ga", [9, 4]), _vi("e1", [2, 3, 4]),
         _vi("e3", [2, 3, 5, 4]), _vi("q", [2, 4, 10, 8]), _vi("k", [2, 4, 12, 8]),
         _vi("vv", [2, 4, 12, 16])],
        [_vi(n, None) for n in ("ab", "vb", "gy", "ey", "ey2", "att")],
        [_w("b", 3, 6, 7), _w("gb", 9, 11), _w("gc", 11), _w("e2", 2, 4, 7), _w("e4", 4, 7)],
        opset=23,
    )
    rep = count_flops(m, {})
    expected = {
        "bcast": 2 * 3 * 5 * 7 * 6,
        "vec": 3 * 7 * 6,
        "gemm": 4 * 11 * 9,
        "ein": 2 * 3 * 4 * 7,
        "ein_ell": 2 * 3 * 5 * 4 * 7,
        "sdpa": 2 * 4 * 10 * 12 * (8 + 16),
    }
    assert rep.matmul_conv == 2 * sum(expected.values())
    assert rep.by_op_type["Gemm"] == 2 * expected["gemm"] + 4 * 11  # + bias
    assert rep.by_op_type["Attention"] == 2 * expected["sdpa"] + 5 * 2 * 4 * 10 * 12


def test_conv3d_and_conv1d():
    nodes = [
        helper.make_node("Conv", ["x3", "w3"], ["y3"], name="c3", group=2, strides=[1, 2, 2],
                         pads=[1, 1, 1, 1, 1, 1]),
        helper.make_node("Conv", ["x1", "w1", "b1"], ["y1"], name="c1", strides=[3]),
    ]
    m = _model(nodes, [_vi("x3", ["n", 4, 6, 8, 8]), _vi("x1", ["n", 3, 20])],
               [_vi("y3", None), _vi("y1", None)],
               [_w("w3", 6, 2, 3, 3, 3), _w("w1", 5, 3, 4), _w("b1", 5)])
    rep = count_flops(m, {"x3": (2, 4, 6, 8, 8)})  # "n" is bound for x1 through x3
    macs3 = 2 * 6 * 6 * 4 * 4 * (4 // 2) * 27
    l1 = _conv_out(20, 4, 3, 0)
    macs1 = 2 * 5 * l1 * 3 * 4
    assert rep.matmul_conv == 2 * (macs3 + macs1)
    assert rep.by_op_type["Conv"] == 2 * (macs3 + macs1) + 2 * 5 * l1


def test_resize_scales_all_external(tmp_path):
    """Shape-relevant float initializers (Resize scales) are read even when *every*
    initializer lives in the external data file (size_threshold=0)."""
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["up"], name="up", mode="linear"),
             helper.make_node("Conv", ["up", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    m = _model(nodes, [_vi("x", ["n", 3, 5, 7])], [_vi("y", None)], [scales, _w("w", 4, 3, 3, 3)])
    onnx.save(m, tmp_path / "r.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="r.onnx.data", size_threshold=0)
    assert all(t.data_location == TensorProto.EXTERNAL
               for t in onnx.load(tmp_path / "r.onnx", load_external_data=False).graph.initializer)
    rep = count_flops(tmp_path / "r.onnx", {"x": (2, 3, 5, 7)})
    assert rep.matmul_conv == 2 * (2 * 4 * 10 * 14 * 3 * 9)
    assert rep.by_op_type["Resize"] == 4 * 2 * 3 * 10 * 14


# --------------------------------------------------------------------------- error paths

def _unknown_shape_model():
    nodes = [helper.make_node("Foo", ["x"], ["h"], name="mystery", domain="custom.ops"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="the_matmul")]
    m = _model(nodes, [_vi("x", ["batch", 4])], [_vi("y", None)], [_w("W", 4, 3)])
    m.opset_import.append(helper.make_opsetid("custom.ops", 1))
    return m


def test_unknown_shape_raises_naming_node():
    with pytest.raises(ValueError, match="the_matmul"):
        count_flops(_unknown_shape_model(), {"x": (2, 4)})


def test_unknown_shape_non_strict_warns():
    with pytest.warns(UserWarning):
        rep = count_flops(_unknown_shape_model(), {"x": (2, 4)}, strict=False)
    assert rep.total == 0
    assert rep.uncounted == {"custom.ops::Foo": 1, "MatMul": 1}
    assert any("the_matmul" in w for w in rep.warnings)


def test_bad_input_shapes(linear_onnx):
    with pytest.raises(ValueError, match="not graph inputs"):
        count_flops(linear_onnx, {"x": (2, 16), "nope": (1,)})
    with pytest.raises(ValueError, match="symbolic"):
        count_flops(linear_onnx, {})
    with pytest.raises(ValueError, match="fixed to 16"):
        count_flops(linear_onnx, {"x": (2, 15)})
    with pytest.raises(ValueError, match="rank"):
        count_flops(linear_onnx, {"x": (2, 16, 1)})
