"""The one training loop, its hooks, phases, options and EMA; it knows no technique.

The package is also callable: `cifarpress.train(model, data, ...)` is cifarpress.pipeline.api.train."""
