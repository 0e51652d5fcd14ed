"""Shared libraries of the pipeline steps: no command line here, and no Airflow import anywhere in tasks/."""
