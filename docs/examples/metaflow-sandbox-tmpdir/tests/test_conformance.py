"""The tmpdir backend against core's shipped conformance suite: all a third party writes.

Layer: tests of the example backend. Imports: pytest and the public core API.
"""

import pytest

from metaflow_extensions.sandbox.core import get_backend
from metaflow_extensions.sandbox.core.conformance import BackendConformance


class TestTmpdir(BackendConformance):
    @pytest.fixture
    def backend(self, tmp_path_factory):
        return get_backend("tmpdir", root=str(tmp_path_factory.mktemp("sandboxes")))
