"""`python -m pipeline.sample` keeps working: it runs `python -m pipeline.cli.sample`."""
import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.cli.sample", run_name="__main__", alter_sys=True)
