"""Records of a run for people and tools: ``mlflow_export`` sends a run to MLflow
(``cluster-experiment report RUN --mlflow [URI]``; mlflow is an optional extra, imported only
there)."""
