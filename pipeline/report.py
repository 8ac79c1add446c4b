"""`python -m pipeline.report` keeps working: it runs `python -m pipeline.cli.report`."""
import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.cli.report", run_name="__main__", alter_sys=True)
