"""The optimizers against the book's update rules, written out plainly."""

import numpy as np
import pytest

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.optimizers import make_optimizer


def book_steps(name, lr, params, grads_seq):
    p = params.copy()
    v = np.zeros_like(p)
    h = np.zeros_like(p)
    m = np.zeros_like(p)
    for t, g in enumerate(grads_seq, start=1):
        if name == "sgd":
            p -= lr * g
        elif name == "momentum":
            v = 0.9 * v - lr * g
            p += v
        elif name == "nesterov":
            v *= 0.9
            v -= lr * g
            p += 0.9 * 0.9 * v
            p -= (1 + 0.9) * lr * g
        elif name == "adagrad":
            h += g * g
            p -= lr * g / (np.sqrt(h) + 1e-7)
        elif name == "rmsprop":
            h *= 0.99
            h += (1 - 0.99) * g * g
            p -= lr * g / (np.sqrt(h) + 1e-7)
        else:
            lr_t = lr * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
            m += (1 - 0.9) * (g - m)
            v += (1 - 0.999) * (g**2 - v)
            p -= lr_t * m / (np.sqrt(v) + 1e-7)
    return p


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"])
def test_updates_follow_the_book(name):
    rng = np.random.default_rng(0)
    start = rng.standard_normal((4, 3))
    grads_seq = [rng.standard_normal((4, 3)) for _ in range(5)]
    optimizer = make_optimizer(name, 0.01)
    param = start.copy()
    for g in grads_seq:
        optimizer.update({"W": param}, {"W": g.copy()})
    np.testing.assert_allclose(param, book_steps(name, 0.01, start, grads_seq), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "adam"])
def test_pieces_on_threads_give_the_same_bits(name):
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(1)
    start = {"W": rng.standard_normal((700, 300)).astype(np.float32),
             "b": rng.standard_normal(300).astype(np.float32)}
    grads_seq = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()}
                 for _ in range(3)]
    results = []
    with ThreadPoolExecutor(3) as pool:
        for pool_, pieces in ((None, 1), (pool, 3)):
            params = {k: v.copy() for k, v in start.items()}
            optimizer = make_optimizer(name, 0.01)
            for grads in grads_seq:
                optimizer.update(params, {k: g.copy() for k, g in grads.items()}, pool_, pieces)
            results.append(params)
    for key in start:
        np.testing.assert_array_equal(results[0][key], results[1][key])


@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "adam"])
def test_descends_a_quadratic(name):
    param = np.array([3.0, -2.0])
    optimizer = make_optimizer(name, {"adagrad": 0.5}.get(name, 0.1))
    for _ in range(200):
        optimizer.update({"x": param}, {"x": 2 * param})
    assert np.abs(param).max() < 0.5


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_gradient_sets_are_added_in_order(name):
    rng = np.random.default_rng(2)
    start = rng.standard_normal(70_000).astype(np.float32)  # more than one chunk
    sets = [{"W": rng.standard_normal(start.shape).astype(np.float32)} for _ in range(3)]
    total = (sets[0]["W"] + sets[1]["W"]) + sets[2]["W"]
    one, several = start.copy(), start.copy()
    make_optimizer(name, 0.01).update({"W": one}, {"W": total})
    make_optimizer(name, 0.01).update({"W": several}, sets)
    np.testing.assert_array_equal(several, one)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_decaying_state_does_not_stay_subnormal(name):
    from lowmem_cnn.engine.optimizers import FLUSH_EVERY

    tiny = np.finfo(np.float32).tiny
    param = np.ones(1000, np.float32)
    optimizer = make_optimizer(name, 0.01)
    optimizer.update({"W": param}, {"W": np.full(1000, 1e-30, np.float32)})
    # with zero gradients the state decays into the subnormals, and is flushed
    assert FLUSH_EVERY < 100
    for _ in range(500):
        optimizer.update({"W": param}, {"W": np.zeros(1000, np.float32)})
    for state in optimizer.state.values():
        assert not ((state != 0) & (np.abs(state) < tiny)).any()
    assert np.isfinite(param).all()


def test_optimizer_settings_are_used():
    start, g = np.ones(3), np.full(3, 0.5)
    plain, changed = start.copy(), start.copy()
    make_optimizer("momentum", 0.1).update({"W": plain}, {"W": g.copy()})
    slow = make_optimizer("momentum", 0.1, momentum=0.5)
    slow.update({"W": changed}, {"W": g.copy()})
    slow.update({"W": changed}, {"W": g.copy()})
    # second step: v = 0.5 * (-0.05) - 0.05
    np.testing.assert_allclose(changed, start - 0.05 - 0.075)
    with pytest.raises(LowmemError, match="do not fit"):
        make_optimizer("sgd", 0.1, momentum=0.9)  # SGD has no such setting
