"""Unit-test setup of the e2b backend.

Layer: tests (e2b backend). Imports: the standard library.

The SDK reads ``E2B_CONNECTION_RETRIES`` once, at import: set it before any test imports ``e2b`` so
that calls to a closed port fail at once instead of after the SDK's own connection retries.
"""

import os

os.environ["E2B_CONNECTION_RETRIES"] = "0"
