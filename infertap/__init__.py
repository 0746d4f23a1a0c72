"""infertap: see and govern model-serving traffic from the kernel.

The import root. `infertap/agent`, `infertap/cli` and `infertap/bpf` are links to the top-level
folders of the repository, so the code lives where the design card puts it while everything
imports as `infertap.agent...` and nothing generic like `agent` reaches site-packages.
"""

__version__ = "0.1.0"
