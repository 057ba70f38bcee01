"""The file names of a model package, importable without torch (registry, pipelines)."""

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
