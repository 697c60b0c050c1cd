"""Metaflow's extension config for metaflow-sandbox: the step decorators and the ``sandbox`` CLI group.

Layer: plugins (the Metaflow integration). Imports: nothing; Metaflow resolves the dotted names
relative to this package when it loads the extension.

``@daytona``, ``@e2b`` and ``@modal`` are registered statically (not through the backend entry points) because
the alias names must resolve inside the sandbox too, where entry points do not exist.
"""

STEP_DECORATORS_DESC = [
    ("sandbox", ".sandbox_decorator.SandboxDecorator"),
    ("daytona", ".sandbox_decorator.DaytonaDecorator"),
    ("e2b", ".sandbox_decorator.E2BDecorator"),
    ("modal", ".sandbox_decorator.ModalDecorator"),
]

CLIS_DESC = [("sandbox", ".sandbox_cli.cli")]
