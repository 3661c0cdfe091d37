"""tracking stage: MLflow runs, the model registry and its promotion rule, version comparison."""
