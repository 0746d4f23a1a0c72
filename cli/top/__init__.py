"""`infertap top`: a live terminal view of models, drift, PII, flows and verdicts.

state.py folds the agent's events and polls into numbers (no UI), source.py is where data comes
from (the TopSource interface and its control-API implementation), app.py draws it with Textual.
"""
