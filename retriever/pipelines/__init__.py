"""Ray pipelines that compose the stages: the Ray Data encode job and the demo."""
