"""The training runtime: the loop, data sources, checkpoints, tracking, run directories, files.

The science (rules, parametrizations, analysis, transfer, diagnostics) sits one level up and
uses this room; this room uses the science only to build a parametrized model and optimizer.
"""
