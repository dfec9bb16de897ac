"""Training stages (LightningModules) and the runners train.py dispatches to: ilkd, smart, kd, dpo, pipeline.

Imports here stay light: `zebra.stages.run` maps `cfg.stage.name` to a runner and imports it on demand.
"""
