"""The policy file: what infertap inspects and what it does about findings (see loader.py)."""
