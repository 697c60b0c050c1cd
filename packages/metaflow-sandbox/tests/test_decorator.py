"""``@sandbox`` validation: attribute checks naming the fix, @resources merging, dedupe of one
family, aliases, the hard time limit, and the metadata labels.

Layer: tests of metaflow-sandbox. Imports: pytest, metaflow, plugins.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from metaflow.plugins.timeout_decorator import TimeoutDecorator

from metaflow_extensions.sandbox.plugins.exceptions import SandboxException
from metaflow_extensions.sandbox.plugins.metadata import selector, task_labels
from metaflow_extensions.sandbox.plugins.sandbox_decorator import (
    GRACE_S,
    DaytonaDecorator,
    E2BDecorator,
    ModalDecorator,
    SandboxDecorator,
)


def validated(deco, *others):
    deco.step = "train"
    deco.attributes["backend"] = deco.attributes["backend"] or "local"
    deco._validate("train", [deco, *others])
    return deco.attributes


def resources(**attrs):
    return SimpleNamespace(name="resources", attributes=attrs, statically_defined=True)


def test_strings_from_with_are_parsed_and_resources_take_the_maximum():
    deco = SandboxDecorator(attributes={"cpu": "2", "memory": "1024", "network": "false", "env": '{"K": "v"}'})
    attrs = validated(deco, resources(cpu="4", memory="512", gpu=None, disk=None))
    assert (attrs["cpu"], attrs["memory"], attrs["network"], attrs["env"]) == (4.0, 1024, False, {"K": "v"})


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"cpu": "lots"}, "cpu=lots must be a number"),
        ({"memory": 1.5}, "memory=1.5 must be an integer"),
        ({"memory": 0}, "memory=0 must be at least 1"),
        ({"gpu": -1}, "gpu=-1 must be at least 0"),
        ({"timeout": "soon"}, "timeout=soon must be an integer"),
        ({"network": "maybe"}, "network='maybe' must be True/False"),
        ({"env": ["K"]}, 'env must be a dict of strings, e.g. env={"KEY": "value"}'),
        ({"env": {"NOT OK": "v"}}, "'NOT OK' is not a valid environment variable name"),
        ({"env": {"X; echo INJECTED >&2; Y": "v"}}, "'X; echo INJECTED >&2; Y' is not a valid environment"),
        ({"env": {"ÄNDERUNG": "v"}}, "'ÄNDERUNG' is not a valid environment variable name"),
        ({"options": {"api_key": "sekrit"}}, "set the environment variable the local backend reads for it"),
        ({"options": {"github_token": "t"}}, "is a credential"),
        ({"image": 3}, "image=3 must be a string"),
        ({"env": "notjson"}, "got 'notjson'"),
        ({"env": {"PATH": "/nowhere"}}, "PATH='/nowhere' leaves out /usr/bin and /bin"),
        ({"env": {"BIG": "x" * 200_000}}, "BIG is 195 KiB; one environment variable holds at most 128 KiB"),
        ({"env": {f"V{i}": "x" * 100_000 for i in range(12)}}, "add up to 1171 KiB"),
    ],
)
def test_bad_attributes_name_the_step_and_the_fix(attrs, message):
    with pytest.raises(SandboxException, match=r"step \*train\*") as err:
        validated(SandboxDecorator(attributes=attrs))
    assert message in str(err.value)


def test_a_path_that_keeps_the_system_directories_is_accepted():
    attrs = validated(SandboxDecorator(attributes={"env": {"PATH": "/opt/tools/bin:/usr/bin:/bin"}}))
    assert attrs["env"]["PATH"] == "/opt/tools/bin:/usr/bin:/bin"


def environment(**variables):
    return SimpleNamespace(name="environment", attributes={"vars": variables}, statically_defined=True)


def test_environment_variable_names_are_checked_before_the_run():
    # They reach the sandbox through shell scripts on some backends: a name must not be code.
    deco = SandboxDecorator(attributes={"backend": "local"})
    with pytest.raises(SandboxException, match=r"@environment\(vars=...\) on step \*train\*: 'X; echo INJ"):
        validated(deco, environment(**{"X; echo INJECTED >&2; Y": "v"}))
    assert validated(SandboxDecorator(attributes={"backend": "local"}), environment(OK_1="$(not run)"))["env"] == {}


def test_a_backends_declared_secret_option_names_its_variable(monkeypatch):
    from metaflow_extensions.sandbox.core import Option, registry

    class Keyed(registry.SandboxBackend):
        name = "keyed"
        options = (Option("login", secret=True, env=("KEYED_LOGIN",)),)

    monkeypatch.setattr(registry, "backend_class", lambda name: Keyed)
    deco = SandboxDecorator(attributes={"backend": "keyed", "options": {"login": "me:pw"}})
    with pytest.raises(SandboxException, match=r"set \$KEYED_LOGIN in the environment"):
        validated(deco)


def test_an_alias_fixes_its_backend():
    assert DaytonaDecorator.alias_of == "daytona" and E2BDecorator.alias_of == "e2b"
    assert ModalDecorator.alias_of == "modal"
    deco = DaytonaDecorator(attributes={"backend": "e2b"})
    with pytest.raises(SandboxException, match=r"Use @sandbox\(backend='e2b'\)"):
        deco._resolve_backend("train")


def test_an_uninstalled_backend_says_what_to_install(monkeypatch):
    monkeypatch.delenv("METAFLOW_SANDBOX_ID", raising=False)
    with pytest.raises(SandboxException, match="nosuch"):
        SandboxDecorator(attributes={"backend": "nosuch"})._resolve_backend("train")


def test_the_default_backend_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_BACKEND", "local")
    assert SandboxDecorator()._resolve_backend("train") == "local"


def test_one_family_per_step_the_static_decorator_wins():
    static = DaytonaDecorator(statically_defined=True)
    dynamic = SandboxDecorator(statically_defined=False)
    decos = [dynamic, static]
    assert dynamic._dedupe("train", decos) is True and static._dedupe("train", decos) is False
    with pytest.raises(SandboxException, match="use one sandbox decorator per step"):
        static._dedupe("train", [static, E2BDecorator(statically_defined=True)])


def test_the_hard_limit_follows_timeout_plus_a_grace_period():
    limit = TimeoutDecorator(attributes={"seconds": 30})
    limit.secs = 30
    assert SandboxDecorator().run_time_limit([limit]) == 30 + GRACE_S
    assert SandboxDecorator(attributes={"timeout": 99}).run_time_limit([limit]) == 99


def test_labels_are_portable_and_select_by_flow_run_and_user():
    labels = task_labels("Flow", "12", "train", "3", attempt=1, user="jo@example.com")
    assert labels["metaflow-user"] == "jo_example.com" and labels["metaflow-attempt"] == "1"
    assert selector("Flow", "12").items() <= labels.items()
    assert selector("Flow", user="jo@example.com").items() <= labels.items()


def cli_args(commands):
    return SimpleNamespace(commands=list(commands), command_args=["train"], entrypoint=["python3", "flow.py"])


def test_the_catch_fallback_and_other_commands_are_not_rerouted():
    # (User-code attempts go to the launcher: every e2e flow checks they ran in a sandbox.)
    deco = SandboxDecorator()
    deco.inert = False
    fallback = cli_args(["step"])  # the @catch fallback attempt runs locally
    deco.runtime_step_cli(fallback, retry_count=2, max_user_code_retries=1, ubf_context=None)
    assert fallback.commands == ["step"]
    spin = cli_args(["spin-step"])
    deco.runtime_step_cli(spin, retry_count=0, max_user_code_retries=0, ubf_context=None)
    assert spin.commands == ["spin-step"]


def test_a_metadata_path_the_step_cannot_take_is_refused_before_the_run(monkeypatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_METADATA_PATH", "direct")
    with pytest.raises(SandboxException, match=r"step \*train\*: METAFLOW_SANDBOX_METADATA_PATH=direct needs"):
        validated(SandboxDecorator(attributes={"network": False}))
    assert validated(SandboxDecorator(attributes={"network": True}))["network"] is True
    monkeypatch.setenv("METAFLOW_SANDBOX_METADATA_PATH", "sideways")
    with pytest.raises(SandboxException, match="must be one of auto, direct, relay"):
        validated(SandboxDecorator(attributes={}))
