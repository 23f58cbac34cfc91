import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowmem_cnn.budget import available_memory, parse_size, resolve_budget
from lowmem_cnn.errors import LowmemError


@pytest.mark.parametrize("text, expected", [
    ("512M", 512 * 2**20), ("2G", 2 * 2**30), ("1.5GiB", int(1.5 * 2**30)), ("2GB", 2 * 10**9),
    ("800MB", 800 * 10**6), ("1048576", 1048576), ("64m", 64 * 2**20), ("1t", 2**40),
    ("3KiB", 3072), ("3kb", 3000), (" 2 G ", 2 * 2**30), ("100B", 100),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["banana", "0", "-1G", "", "1.2.3G", "5X", "G", "0.0001", "nan"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["K", "M", "G", "KiB", "MiB"]))
def test_binary_units_are_powers_of_1024(n, unit):
    power = {"K": 1, "M": 2, "G": 3}[unit[0]]
    assert parse_size(f"{n}{unit}") == n * 1024**power
    assert parse_size(f"{n}{unit[0]}B") == n * 1000**power


def test_default_budget_is_a_share_of_available_ram():
    assert 0 < resolve_budget(None) <= available_memory()


def test_resolve_budget_reports_garbage():
    with pytest.raises(LowmemError, match="banana"):
        resolve_budget("banana")


def test_proc_figures_agree_with_psutil():
    import psutil

    from lowmem_cnn.budget import available_memory, current_rss

    assert abs(current_rss() - psutil.Process().memory_info().rss) < 2 * 2**20
    assert 0 < available_memory() <= psutil.virtual_memory().total
