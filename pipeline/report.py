"""`python -m pipeline.report` keeps working: it runs `python -m pipeline.runtime.report`."""
import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.runtime.report", run_name="__main__", alter_sys=True)
