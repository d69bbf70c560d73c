import dataclasses
from typing import Literal

import pytest

from radscribe.config import load_config, save_config
from radscribe.errors import RadscribeError


@dataclasses.dataclass
class Inner:
    rank: int = 8
    """LoRA rank."""
    lr: float = 5e-5
    """Learning rate."""
    target: list[str] = dataclasses.field(default_factory=lambda: ["all"])
    """Modules."""


@dataclasses.dataclass
class Outer:
    name: str = "x"
    """Name."""
    mode: Literal["a", "b"] = "a"
    """Mode."""
    path: str | None = None
    """Optional path."""
    inner: Inner = dataclasses.field(default_factory=Inner)
    """Nested section."""


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: y\ninner:\n  rank: 16\n  lr: 5e-5\n")
    cfg = load_config(Outer, str(f), ["inner.rank=32", "mode=b", "inner.target=q_proj,v_proj", "path=/d"])
    assert cfg.name == "y" and cfg.mode == "b" and cfg.path == "/d"
    assert cfg.inner.rank == 32 and cfg.inner.lr == pytest.approx(5e-5)
    assert cfg.inner.target == ["q_proj", "v_proj"]
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Outer, str(out)) == cfg


@pytest.mark.parametrize("override, message", [
    ("inner.rnk=3", "unknown field"),
    ("mode=c", "not one of"),
    ("inner.rank=abc", "expected int"),
    ("noequals", "not of the form"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(RadscribeError, match=message):
        load_config(Outer, None, [override])


def test_unknown_preset_lists_known():
    with pytest.raises(RadscribeError, match="unknown preset"):
        load_config(Outer, "no-such-preset")


def test_help_reads_the_field_docstrings_and_defaults():
    from radscribe.config import config_help, describe

    assert [(e.name, e.section) for e in describe(Outer)] == [
        ("name", False), ("mode", False), ("path", False), ("inner", True), ("inner.rank", False),
        ("inner.lr", False), ("inner.target", False)]
    lines = config_help(Outer).splitlines()
    assert "  mode          a        Mode. [a|b]" in lines and "inner: Nested section." in lines
    assert "  inner.target  [\"all\"]  Modules." in lines and "  path          null     Optional path." in lines


def test_config_from_args_flags_win_and_stay_strings():
    from radscribe.config import config_from_args

    cfg = config_from_args(Outer, None, ["name=z", "inner.rank=2"], **{"name": "a: b #1", "inner.rank": None})
    assert (cfg.name, cfg.inner.rank) == ("a: b #1", 2)  # None = flag not given


def test_required_fields_and_changed_fields():
    from radscribe.config import changed_fields

    @dataclasses.dataclass
    class Needs:
        model: str
        """Required."""

    with pytest.raises(RadscribeError, match="model must be given"):
        load_config(Needs, None, [])
    assert changed_fields(Outer(), load_config(Outer, None, ["inner.rank=9", "path=/x"]), ignore=("path",)) == [
        "inner.rank: 8 -> 9"]
