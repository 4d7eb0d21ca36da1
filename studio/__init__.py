"""kiln studio: a local web application over the functions and commands the CLI uses.

Training, export, evaluation and serving run as the same ``kiln`` commands in subprocesses; the run
folders on disk are the source of truth, and an SQLite database in the workspace holds only the job
queue and job state.
"""
