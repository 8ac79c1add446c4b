"""`python -m pipeline.port` keeps working: it runs `python -m pipeline.cli.port`."""
import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.cli.port", run_name="__main__", alter_sys=True)
