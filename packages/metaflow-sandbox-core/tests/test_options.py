"""Backend options: declared once, coerced from strings, defaulted from the environment, checked.

Layer: core tests. Imports: pytest and core.
"""

from __future__ import annotations

import pytest

from metaflow_extensions.sandbox.core import ConfigurationError, Option, get_backend
from metaflow_extensions.sandbox.core.options import markdown_table, resolve, secret_variables

DECLARED = (
    Option("key", secret=True, env=("PROVIDER_KEY",)),
    Option("timeout_s", float, 300.0, positive=True),
    Option("retries", int, 3),
    Option("fast", bool, False),
    Option("mode", default="a", choices=("a", "b")),
)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"timeout_s": "600"}, 600.0),  # what --with and decorator dicts carry: strings
        ({"timeout_s": 600}, 600.0),
        ({"retries": "5"}, 5),
        ({"retries": "5.0"}, 5),
        ({"fast": "yes"}, True),
        ({"fast": "False"}, False),
        ({"mode": "b"}, "b"),
    ],
)
def test_strings_are_coerced_to_the_declared_type(given, expected):
    name = next(iter(given))
    assert resolve("prov", DECLARED, given, environ={})[name] == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"timeout_s": "soon"}, "timeout_s='soon' must be a number"),
        ({"timeout_s": 0}, "timeout_s=0 must be positive"),
        ({"retries": 2.5}, "retries=2.5 must be an integer"),
        ({"retries": True}, "retries=True must be an integer"),
        ({"fast": "maybe"}, "fast='maybe' must be true or false"),
        ({"mode": "c"}, "mode='c' must be one of a, b"),
        ({"key": 42}, "key=42 must be a string"),
    ],
)
def test_bad_values_name_the_option_and_what_it_must_be(given, message):
    with pytest.raises(ConfigurationError, match="The prov backend's option") as info:
        resolve("prov", DECLARED, given, environ={})
    assert message in str(info.value)


def test_unknown_options_are_refused_naming_the_valid_ones():
    with pytest.raises(ConfigurationError) as info:
        resolve("prov", DECLARED, {"colour": "blue", "mood": 1}, environ={})
    assert "Unknown options 'colour', 'mood' for the 'prov' sandbox backend" in str(info.value)
    assert "Its options are: fast, key, mode, retries, timeout_s." in str(info.value)


def test_every_option_defaults_from_our_variable_then_the_providers_then_its_default():
    environ = {"METAFLOW_SANDBOX_PROV_RETRIES": "7", "PROVIDER_KEY": "from-provider-var"}
    resolved = resolve("prov", DECLARED, {}, environ=environ)
    assert resolved == {"key": "from-provider-var", "timeout_s": 300.0, "retries": 7, "fast": False, "mode": "a"}
    environ["METAFLOW_SANDBOX_PROV_KEY"] = "ours-first"
    assert resolve("prov", DECLARED, {"retries": 1}, environ=environ)[("key")] == "ours-first"
    assert resolve("prov", DECLARED, {"retries": 1}, environ=environ)["retries"] == 1, "given beats the environment"
    with pytest.raises(ConfigurationError, match=r"\$METAFLOW_SANDBOX_PROV_TIMEOUT_S: timeout_s='x'"):
        resolve("prov", DECLARED, {}, environ={"METAFLOW_SANDBOX_PROV_TIMEOUT_S": "x"})


def test_credentials_name_the_variable_to_set_instead():
    assert secret_variables("prov", DECLARED) == {"key": "PROVIDER_KEY"}


def test_the_docs_table_comes_from_the_declaration():
    table = markdown_table("prov", DECLARED).splitlines()
    assert table[0].startswith("| option | type | default | environment |")
    assert "| `timeout_s` | float | `300.0` | `METAFLOW_SANDBOX_PROV_TIMEOUT_S` |" in table[3]
    assert "`a` / `b`" in table[6] and "Credential" in table[2]


def test_get_backend_resolves_against_the_local_declaration(monkeypatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_LOCAL_ISOLATION", "process")
    assert get_backend("local").isolation == "process"
    with pytest.raises(ConfigurationError, match="isolation='chroot' must be one of auto, bwrap, process"):
        get_backend("local", isolation="chroot")
