"""Metaflow's part of ``metaflow-sandbox doctor``: the datastore finding says which datastores
``@sandbox`` runs on (local, S3) and names the fix for the others.

Layer: tests of metaflow-sandbox. Imports: pytest, plugins.
"""

from __future__ import annotations

import pytest

from metaflow_extensions.sandbox.plugins.doctor import metaflow_findings


def _datastore(kind: str):
    [finding] = [f for f in metaflow_findings(kind) if f.check == "metaflow: datastore"]
    return finding


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_supported_datastore_is_ok(kind):
    finding = _datastore(kind)
    assert finding.status == "ok" and finding.detail.startswith(kind)


def test_another_datastore_fails_naming_the_supported_ones():
    finding = _datastore("azure")
    assert finding.failed and "local, s3" in finding.detail
    assert finding.fix is not None and "--datastore=s3" in finding.fix
