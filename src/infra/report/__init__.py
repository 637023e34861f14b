"""Records of a run for people and tools (``cluster-experiment report RUN``).

The HTML report: ``model`` holds the typed inputs, ``build`` turns them into the page (pure:
no file, no store), ``charts`` makes the plotly figures, ``html`` the escaping and the tables,
and ``files`` gathers the inputs from the store and the run's directory and writes the file.
``mlflow_export`` sends a run to MLflow (``report RUN --mlflow [URI]``). plotly and mlflow are
optional extras (``[report]``, ``[mlflow]``), each imported only where it is used.
"""
