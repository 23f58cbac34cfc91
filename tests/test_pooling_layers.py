"""Average pooling and global average pooling: against plain references and numerical
gradients, their memory as their declarations state it, in a network built from a
config (gradient, refusals), exported to ONNX, and in profile-memory's table."""

import numpy as np
import pytest
from test_export import SCORE_TOLERANCE, onnx_run, ort, random_network  # noqa: F401 (ort: a fixture)
from test_layers import PoisonedWorkspace, numerical_grad
from test_network import SMALL_ARRAYS, allocated_besides, loss_of, plan

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.average_pooling import AveragePooling
from lowmem_cnn.engine.global_average_pooling import GlobalAveragePooling
from lowmem_cnn.engine.model import Network
from lowmem_cnn.engine.workspace import Context, Recording, Workspace
from lowmem_cnn.files.config import load_config
from lowmem_cnn.memory.planner import chosen_plan

# (height, width, size, stride): windows that tile the input, overlapping ones, odd
# sides the windows do not cover, and strides above the size (values no window reads)
POOL_CASES = [
    (8, 8, 2, 2),
    (9, 9, 3, 2),
    (7, 7, 3, 1),
    (7, 7, 2, 2),
    (7, 5, 2, 2),
    (8, 7, 1, 1),
    (9, 8, 2, 3),
    (5, 5, 5, 1),  # one window: the whole map
]


def reference_average_pool(x, size, stride):
    """NHWC, float64, a window at a time."""
    n, h, w, c = x.shape
    oh, ow = (h - size) // stride + 1, (w - size) // stride + 1
    out = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            window = x[:, i * stride : i * stride + size, j * stride : j * stride + size, :]
            out[:, i, j, :] = window.astype(np.float64).mean(axis=(1, 2))
    return out


# --- 1. average pooling ------------------------------------------------------------------


@pytest.mark.parametrize("h,w,size,stride", POOL_CASES)
def test_average_pooling_matches_the_reference(h, w, size, stride):
    rng = np.random.default_rng(h * 100 + w * 10 + size + stride)
    c = 3
    pool = AveragePooling((h, w, c), size, stride)
    assert pool.out_shape == ((h - size) // stride + 1, (w - size) // stride + 1, c)
    ws = PoisonedWorkspace()  # arrays full of NaN: nothing may rely on zeros
    for m in (2, 4, 1):  # one workspace, micro-batches of changing sizes
        x = rng.standard_normal((m, h, w, c))
        given = x.copy()
        for train in (False, True):
            out, saved = pool.forward(given, Context(ws, train))
            assert saved is None and out.dtype == np.float64
            assert ws.holds(out)
            np.testing.assert_allclose(out, reference_average_pool(x, size, stride), rtol=1e-12,
                                       atol=1e-14)
            np.testing.assert_array_equal(given, x)  # the input is not written


@pytest.mark.parametrize("h,w,size,stride", POOL_CASES)
def test_average_pooling_gradient_is_numerical(h, w, size, stride):
    """dx of sum(out * weights), against central differences (float64: the layer is
    linear, so the differences are exact to rounding)."""
    rng = np.random.default_rng(7 + h + size)
    c = 2
    pool = AveragePooling((h, w, c), size, stride)
    x = rng.standard_normal((2, h, w, c))
    weights = rng.standard_normal((2, *pool.out_shape))

    def objective():
        out, _ = pool.forward(x, Context(Workspace(), True))
        return float(np.sum(out * weights))

    expected = numerical_grad(objective, x)
    ws = PoisonedWorkspace()
    ctx = Context(ws, True)
    for _ in range(2):  # the second time, the workspace's gradient holds the first's
        out, saved = pool.forward(x.copy(), ctx)
        dout = weights.copy()
        dx = pool.backward(dout, saved, None, ctx)
        assert dx.shape == x.shape and dx.dtype == np.float64 and dx.flags.c_contiguous
        np.testing.assert_allclose(dx, expected, rtol=1e-7, atol=1e-9)
        np.testing.assert_array_equal(dout, weights)  # its output gradient is not written
        # where no window reads, the gradient is zero (and only there, for random weights)
        covered = np.zeros((h, w), bool)
        oh, ow, _ = pool.out_shape
        for i in range(oh):
            for j in range(ow):
                covered[i * stride : i * stride + size, j * stride : j * stride + size] = True
        assert (dx[:, ~covered] == 0).all()
        assert (dx[:, covered] != 0).all()


def test_average_pooling_without_input_gradient_returns_none_and_asks_nothing():
    pool = AveragePooling((6, 6, 2), 2, 2)
    pool.need_input_grad = False
    x = np.random.default_rng(0).standard_normal((3, 6, 6, 2))
    for ws in (Workspace(), Recording()):
        ctx = Context(ws, True)
        out, saved = pool.forward(x.copy(), ctx)
        held = ws.held_bytes()
        assert pool.backward(np.ones_like(out), saved, None, ctx) is None
        assert ws.held_bytes() == held == 3 * 3 * 3 * 2 * 8  # its output alone


def test_average_pooling_float32_and_bad_geometry():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 9, 9, 4)).astype(np.float32)
    pool = AveragePooling((9, 9, 4), 3, 2)
    out, _ = pool.forward(x, Context(Workspace()))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference_average_pool(x, 3, 2), rtol=1e-5, atol=1e-6)
    dx = pool.backward(np.ones_like(out), None, None, Context(Workspace(), True))
    assert dx.dtype == np.float32
    # a value in k of the overlapping windows gets k / 9
    np.testing.assert_allclose(dx[0, :5, 0, 0], np.array([1, 1, 2, 1, 2]) / 9, rtol=1e-6)
    with pytest.raises(ValueError, match="larger than its 4x4 input"):
        AveragePooling((4, 4, 1), 5, 1)
    with pytest.raises(ValueError, match="stride 0"):
        AveragePooling((4, 4, 1), 2, 0)


# --- 2. global average pooling ----------------------------------------------------------


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 1, 4), (4, 4, 1)])
def test_global_average_pooling_is_the_mean_and_its_gradient_numerical(dtype, rtol, shape):
    rng = np.random.default_rng(sum(shape))
    layer = GlobalAveragePooling(shape)
    assert layer.out_shape == (shape[2],)
    x64 = rng.standard_normal((3, *shape))
    x = x64.astype(dtype)
    ws = PoisonedWorkspace()
    ctx = Context(ws, True)
    out, saved = layer.forward(x.copy(), ctx)
    assert out.dtype == dtype and out.shape == (3, shape[2]) and ws.holds(out)
    np.testing.assert_allclose(out, x.astype(np.float64).mean(axis=(1, 2)), rtol=rtol,
                               atol=rtol)

    weights64 = rng.standard_normal((3, shape[2]))

    def objective():  # in float64: the differences of float32 sums are too coarse
        out, _ = layer.forward(x64, Context(Workspace(), True))
        return float(np.sum(out * weights64))

    expected = numerical_grad(objective, x64)
    for _ in range(2):  # the same workspace again
        dx = layer.backward(weights64.astype(dtype), saved, None, ctx)
        assert dx.dtype == dtype and dx.shape == x.shape and dx.flags.c_contiguous
        np.testing.assert_allclose(dx, expected, rtol=max(rtol, 1e-7), atol=max(rtol, 1e-9))
    layer.need_input_grad = False
    assert layer.backward(weights64.astype(dtype), saved, None, ctx) is None


# --- 3. memory: what the dry pass records is what a real pass holds ----------------------

MEMORY_LAYERS = [
    ("avgpool 2", lambda: AveragePooling((32, 32, 16), 2, 2)),
    ("avgpool 3/2", lambda: AveragePooling((33, 31, 16), 3, 2)),
    ("avgpool 2 odd", lambda: AveragePooling((31, 31, 16), 2, 2)),
    ("global", lambda: GlobalAveragePooling((32, 32, 16))),
]


@pytest.mark.parametrize("need_input_grad", [True, False])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name,make", MEMORY_LAYERS, ids=[name for name, _ in MEMORY_LAYERS])
def test_recorded_memory_is_what_a_real_pass_holds(name, make, train, need_input_grad):
    """Forward only (train False), or forward and backward: the Recording of a dry pass
    is, to the byte, what a real Workspace holds after the same pass, and the pass
    allocates nothing else of the size of its maps."""
    layer = make()
    layer.need_input_grad = need_input_grad
    m = 8  # float64 maps of 1 MiB: an array made outside the workspace would show
    rng = np.random.default_rng(5)
    x = rng.standard_normal((m, *layer.in_shape))
    dout = rng.standard_normal((m, *layer.out_shape))

    recording = Recording()
    ctx = Context(recording, train)
    assert ctx.dry
    dry_x = x.copy()
    out, saved = layer.forward(dry_x, ctx)
    assert out.shape == (m, *layer.out_shape)
    if train:
        dx = layer.backward(out, saved, None, ctx)
        assert (dx is None) == (not need_input_grad)
        assert dx is None or dx.shape == x.shape
    np.testing.assert_array_equal(dry_x, x)  # a dry pass computes nothing
    figure = recording.held_bytes()
    assert figure >= m * np.prod(layer.out_shape) * 8  # its output, at least

    ws = Workspace()

    def real_pass():  # (neither layer writes its input or its output gradient)
        ctx = Context(ws, train)
        out, saved = layer.forward(x, ctx)
        if train:
            layer.backward(dout, saved, None, ctx)

    real_pass()
    assert ws.held_bytes() == figure
    assert min(allocated_besides(real_pass) for _ in range(3)) < SMALL_ARRAYS
    assert ws.held_bytes() == figure  # the same arrays again
    # a smaller micro-batch fits in what is held; a dry pass of it records less
    small = Recording()
    ctx = Context(small, train)
    out, saved = layer.forward(x[:3], ctx)
    if train:
        layer.backward(out, saved, None, ctx)
    assert small.held_bytes() * m == figure * 3


# --- 4. a network of them, from a config --------------------------------------------------

CONFIG = """
[network]
name = "average"
input_shape = [3, {side}, {side}]
weight_init = 0.3

[[network.layers]]
type = "conv"
filters = 4
size = 3
pad = 1

[[network.layers]]
type = "relu"

[[network.layers]]
type = "avgpool"
{pool}

[[network.layers]]
type = "conv"
filters = 5
size = 3

[[network.layers]]
type = "relu"

[[network.layers]]
type = "global_avgpool"

[[network.layers]]
type = "affine"
units = 4
"""


def write_config(tmp_path, side=12, pool="size = 2", name="average.toml"):
    path = tmp_path / name
    path.write_text(CONFIG.format(side=side, pool=pool))
    return path


def average_network(tmp_path, dtype=np.float64, **options) -> Network:
    network = Network(load_config(str(write_config(tmp_path, **options))).network, dtype)
    network.init_params(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for value in network.params().values():  # biases too: ReLUs that cut at various places
        value[...] = rng.normal(0, 0.3, value.shape)
    return network


def test_the_network_keeps_its_layers_in_order(tmp_path):
    """Average pooling neither commutes with ReLU nor fuses with a convolution."""
    network = average_network(tmp_path)
    assert [type(layer).__name__ for layer in network.layers] == [
        "Convolution", "ReLU", "AveragePooling", "Convolution", "ReLU", "GlobalAveragePooling",
        "Affine"]
    assert [layer.out_shape for layer in network.layers] == [
        (12, 12, 4), (12, 12, 4), (6, 6, 4), (4, 4, 5), (4, 4, 5), (5,), (4,)]
    assert list(network.params()) == ["W1", "b1", "W2", "b2", "W3", "b3"]


def test_whole_network_gradient_numerically(tmp_path):
    network = average_network(tmp_path)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, network.input_size), dtype=np.uint8)
    labels = np.array([1, 3, 0])
    loss = network.accumulate_gradient(images, labels, plan(network, 3))
    assert loss == pytest.approx(loss_of(network, images, labels), rel=1e-12)
    analytic = {key: grad.copy() for key, grad in network.grads(plan(network, 3)).items()}
    for key, param in network.params().items():
        flat = param.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + 1e-6
            up = loss_of(network, images, labels)
            flat[i] = old - 1e-6
            down = loss_of(network, images, labels)
            flat[i] = old
            numeric = (up - down) / 2e-6
            assert abs(numeric - analytic[key].reshape(-1)[i]) <= 1e-7 + 1e-5 * abs(numeric), (key, i)
    # micro-batches of 1 and 2 images give the whole batch's gradient
    for micro in (1, 2):
        assert network.accumulate_gradient(images, labels, plan(network, micro)) == \
            pytest.approx(loss, rel=1e-12)
        for key, grad in network.grads(plan(network, micro)).items():
            np.testing.assert_allclose(grad, analytic[key], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("train", [False, True])
def test_the_networks_memory_figure_is_what_a_real_pass_holds(tmp_path, train):
    network = average_network(tmp_path, np.float32)
    rng = np.random.default_rng(4)
    # two micro-batches: the second adds into the gradients, as the figure counts
    images = rng.integers(0, 256, (12, network.input_size), dtype=np.uint8)
    labels = rng.integers(0, 4, 12)
    tiles = (7,) * len(network.tiled)
    figure = network.micro_batch_bytes(6, train, tiles)
    if train:
        network.accumulate_gradient(images, labels, chosen_plan(network, 6, 1, tiles))
    else:
        network.predict(images, chosen_plan(network, 6, 1, tiles))
    assert network.workspaces[0].held_bytes() == figure


def one_line_error(tmp_path, text, build=False) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(LowmemError) as caught:
        config = load_config(str(path))
        assert build, "the config was taken"
        Network(config.network)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_bad_configs_are_refused_in_one_line(tmp_path):
    said = one_line_error(tmp_path, CONFIG.format(side=12, pool="sise = 2"))
    assert "layer 3 (avgpool)" in said and "sise" in said and "did you mean size?" in said
    said = one_line_error(tmp_path, CONFIG.format(side=12, pool="size = 2\nstrid = 1"))
    assert "strid" in said and "did you mean stride?" in said
    said = one_line_error(tmp_path, CONFIG.format(side=12, pool="stride = 2"))
    assert "layer 3 (avgpool): missing size" in said
    said = one_line_error(tmp_path, CONFIG.format(side=12, pool="size = 0"))
    assert "layer 3 (avgpool)" in said and "size = 0" in said
    # a pool larger than its map
    said = one_line_error(tmp_path, CONFIG.format(side=12, pool="size = 13"), build=True)
    assert said == "layer 3 (avgpool): a 13x13 pool is larger than its 12x12 input"
    # global average pooling takes no setting, and needs a map
    said = one_line_error(tmp_path, CONFIG.format(side=12, pool="size = 2").replace(
        'type = "global_avgpool"', 'type = "global_avgpool"\nsize = 2'))
    assert "layer 6 (global_avgpool) has no size" in said
    vector_input = CONFIG.format(side=12, pool="size = 2").replace(
        'type = "global_avgpool"', 'type = "affine"\nunits = 8\n\n[[network.layers]]\n'
                                   'type = "global_avgpool"')
    said = one_line_error(tmp_path, vector_input, build=True)
    assert said == "layer 7 (global_avgpool): needs a map, but its input is a vector of 8"
    said = one_line_error(tmp_path, vector_input.replace('type = "global_avgpool"',
                                                         'type = "global_avgpol"'))
    assert "did you mean global_avgpool?" in said


# --- 5. ONNX ----------------------------------------------------------------------------------


@pytest.mark.parametrize("side,pool", [(12, "size = 2"), (13, "size = 3\nstride = 2"),
                                       (13, "size = 2")])
def test_the_network_exports_to_onnx(ort, tmp_path, side, pool):  # noqa: F811 (the fixture)
    import onnx

    from lowmem_cnn.files.export import save_onnx

    network = random_network(write_config(tmp_path, side, pool))
    assert network.dtype == np.float32
    out = tmp_path / "average.onnx"
    done = save_onnx(network, out)
    assert done.opset == 9  # the network's oldest: every node means ours before it
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 9)]
    assert [n.op_type for n in model.graph.node] == [
        "Conv", "Relu", "AveragePool", "Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    rng = np.random.default_rng(side)
    images = rng.integers(0, 256, (40, network.input_size), dtype=np.uint8)
    engine = network.predict_scores(images, chosen_plan(network, 16))
    found = onnx_run(ort, out, images, network.config.input_shape)
    assert found.shape == engine.shape == (40, 4)
    assert np.abs(found - engine).max() <= SCORE_TOLERANCE
    assert np.ptp(engine, axis=0).min() > 100 * SCORE_TOLERANCE  # the scores depend on the image


# --- 6. profile-memory's rows ------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
def test_profile_rows_are_what_each_layer_records_alone(tmp_path, train):
    from lowmem_cnn.profiling import layer_table

    network = average_network(tmp_path, np.float32)
    tiles = (7,) * len(network.tiled)
    the_plan = chosen_plan(network, 5, 1, tiles)
    rows = layer_table(network, the_plan, 50, train)
    recordings = network.layer_recordings(5, train, tiles)
    assert len(rows) == len(network.layers) == len(recordings)
    assert [row["layer"] for row in rows] == [layer.describe() for layer in network.layers]
    for row, recording in zip(rows, recordings, strict=True):
        assert row["workspace_bytes"] == recording.held_bytes(), row["layer"]
    pool, gap = network.layers[2], network.layers[5]
    assert (rows[2]["layer"], rows[5]["layer"]) == ("avgpool 2x2 stride 2", "global avgpool 4x4")
    assert rows[2]["output_shape"] == [4, 6, 6] and rows[5]["output_shape"] == [5]
    for row, layer in ((rows[2], pool), (rows[5], gap)):
        assert row["tiled_bytes"] == 0 and row["tile"] is None and row["tile_unit"] is None
        assert row["workspace_bytes"] > 0
        assert row["book_im2col_bytes"] == layer.book_columns_bytes(50)
        if not train:  # forward only, they hold their output alone
            assert row["workspace_bytes"] == row["activation_bytes"] == \
                5 * int(np.prod(layer.out_shape)) * 4
    assert rows[2]["book_im2col_bytes"] == 50 * 6 * 6 * 4 * 2 * 2 * 8 and rows[5]["book_im2col_bytes"] == 0
    assert rows[0]["tile"] == 7 and rows[0]["tiled_bytes"] > 0  # the convolutions' tiles, beside
