"""The one exception class of the Metaflow integration, shown by Metaflow with its headline.

Layer: plugins (bottom of the integration). Imports: metaflow.exception only (cheap: this module is
imported at every ``import metaflow`` through the decorator module).
"""

from metaflow.exception import MetaflowException


class SandboxException(MetaflowException):
    """A problem with ``@sandbox`` or a sandboxed task; the message states the rule and the fix."""

    headline = "Sandbox error"
