"""Run a few commands in a local sandbox through the core API (no Metaflow needed).

Layer: example. Imports: metaflow_extensions.sandbox.core.
"""

from metaflow_extensions.sandbox.core import Resources, SandboxSpec, get_backend

backend = get_backend("local")
spec = SandboxSpec(env={"GREETING": "hello"}, labels={"owner": "demo"}, resources=Resources(cpu=1, memory_mb=1024))
with backend.create(spec) as sbx:
    print(f"created {sbx.id} ({backend.isolation} isolation)")
    sbx.upload(b"42\n", "answer.txt")
    res = sbx.run("echo $GREETING from $(hostname); cat answer.txt; ls ~ /root 2>&1 | head -3", on_stdout=print)
    print(f"exit code {res.exit_code}; live sandboxes labelled owner=demo: {len(backend.list({'owner': 'demo'}))}")
print(f"destroyed; left behind: {len(backend.list({'owner': 'demo'}))}")
