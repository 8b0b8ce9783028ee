"""qkformer.env.flag: one spelling of on/off switches."""
import pytest

from qkformer.env import flag


@pytest.mark.parametrize("value, expected", [("", None), ("  ", None), ("0", False),
                                             ("False", False), ("no", False), (" OFF ", False),
                                             ("1", True), ("yes", True), ("on", True)])
def test_flag(monkeypatch, value, expected):
    monkeypatch.setenv("QKFORMER_TEST_SWITCH", value)
    assert flag("QKFORMER_TEST_SWITCH") is expected
    assert flag("QKFORMER_TEST_SWITCH", True) is (True if expected is None else expected)


def test_unset_gives_the_default(monkeypatch):
    monkeypatch.delenv("QKFORMER_TEST_SWITCH", raising=False)
    assert flag("QKFORMER_TEST_SWITCH", False) is False
