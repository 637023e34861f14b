"""The run report: one self-contained HTML file with plotly charts (``cluster-experiment
report RUN``).

``model`` holds the typed inputs, ``build`` turns them into the page (pure: no file, no
store), ``charts`` makes the plotly figures, ``html`` the escaping and the tables, and
``files`` gathers the inputs from the store and the run's directory and writes the file.
plotly is an optional extra (``pip install 'lab-orchestrator[report]'``), imported only here.
"""
