"""rapid_pipeline: the library behind the `rapid` CLI and the Airflow DAGs.

Invariant: nothing under this package imports airflow (tests/test_no_airflow_import.py).
"""

__version__ = "0.1.0"
