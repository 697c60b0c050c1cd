"""A flow whose step reads another flow's run through the Client API (Metaflow's tutorial 03
pattern: a step reads tutorial 02's results): the run of ``ServiceFlow`` named by ``--origin``.

Layer: tests-shared/remote (a flow run by the metadata-service tests). Imports: metaflow.
"""

from metaflow import FlowSpec, Parameter, step


class ClientFlow(FlowSpec):
    origin = Parameter("origin", type=str, required=True)

    @step
    def start(self):
        from metaflow import Run, namespace

        namespace(None)
        run = Run(f"ServiceFlow/{self.origin}")
        self.seen_values = run["join"].task["values"].data
        self.seen_alpha = run.data.alpha
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ClientFlow()
