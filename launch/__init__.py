"""Entry points: the `ranker` command, the launcher, the main job and process supervision.

The library packages (`ranker`, `service`, `training`) never import this package.
"""
