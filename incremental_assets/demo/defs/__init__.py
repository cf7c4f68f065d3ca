"""The project's defs folder (``[tool.dg.project] defs_module``): the demo's component instance."""
