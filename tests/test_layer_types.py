"""Every layer type answers for itself: no module outside a layer's own switches on
layer classes, and each type a config can name gives its parameters, book layout,
ONNX nodes, tiles and profile rows."""

import ast
import re
from pathlib import Path

import numpy as np
import pytest

import lowmem_cnn
from lowmem_cnn.engine.layer_types import LAYER_TYPES
from lowmem_cnn.engine.layers import Layer, Setting
from lowmem_cnn.engine.workspace import Recording

PACKAGE = Path(lowmem_cnn.__file__).parent
LAYER_CLASSES = {cls.__name__ for cls in LAYER_TYPES.values()} | {"ConvolutionPooling", "Layer", "Pooling"}


def layer_class_checks(path: Path, root: Path = PACKAGE) -> list[str]:
    """isinstance/issubclass calls in `path` that name a layer class."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2):
            named = {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node.args[1])
                     if isinstance(n, (ast.Name, ast.Attribute))}
            if named & LAYER_CLASSES:
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_no_module_switches_on_layer_classes():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in layer_class_checks(path)]
    assert found == []


def test_the_check_sees_a_switch(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f(layer):\n    return isinstance(layer, (Convolution, int))\n")
    assert layer_class_checks(module, tmp_path) == ["m.py:2"]


SHAPES = {"map": (6, 6, 2), "vector": (8,)}
SPECS = {"conv": {"filters": 3, "size": 3, "pad": 1}, "pool": {"size": 2}, "avgpool": {"size": 2},
         "affine": {"units": 4}, "dropout": {"ratio": 0.5}}


@pytest.mark.parametrize("kind", sorted(LAYER_TYPES))
def test_each_type_answers_for_itself(kind):
    cls = LAYER_TYPES[kind]
    assert cls.kind == kind and re.fullmatch(r"[a-z_]+", kind)
    # its settings say what they take: no table of setting names elsewhere
    assert all(isinstance(setting, Setting) for setting in cls.settings.values())
    layer = cls.from_spec(SPECS.get(kind, {}), SHAPES["map" if cls.takes_map else "vector"])
    rng = np.random.default_rng(0)
    for name in (*layer.param_shapes, *layer.state_shapes):
        value = layer.initial(name, rng, "he", np.float32)
        assert value.shape == layer.shape_of(name) and value.dtype == np.float32
        setattr(layer, name, value)
        book = layer.to_book(name, value)
        assert book.shape == layer.book_shape(name)
        np.testing.assert_array_equal(layer.from_book(name, book, np.float32), value)
    assert (layer.tile_unit is None) == (layer.tile_size(5, 1 << 16, 2, 4) is None)
    assert isinstance(layer.describe(), str)
    rows = layer.profile_rows(Recording(), 10, None)
    assert [row["layer"] for row in rows] == [layer.describe()]
    # every shipped type has its ONNX nodes (the base class refuses in one line)
    assert cls.onnx is not Layer.onnx
