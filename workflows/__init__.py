"""ca-flow's orchestration: the CLI, Ray Tune sweeps, MLflow tracking, promotion, reports."""
