"""A flow whose step reads another flow's run through the Client API (Metaflow's tutorial 03
pattern: a step reads tutorial 02's results): the run of ``ServiceFlow`` named by ``--origin``.

Layer: tests-shared/remote (a flow run by the metadata-service tests). Imports: metaflow.
"""

from metaflow import FlowSpec, Parameter, step


def artifacts(step):
    """The artifacts of the step's (one) task, by name."""
    return {a.id: a for a in next(iter(step))}


class ClientFlow(FlowSpec):
    origin = Parameter("origin", type=str, required=True)

    @step
    def start(self):
        from metaflow import Run, namespace

        namespace(None)
        run = Run(f"ServiceFlow/{self.origin}")
        # By iteration, not by name: the test's service peer (metaflow-local-service) has no
        # endpoint for one artifact by name.
        steps = {s.id: s for s in run}
        self.seen_values = artifacts(steps["join"])["values"].data
        self.seen_alpha = artifacts(steps["start"])["alpha"].data
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ClientFlow()
