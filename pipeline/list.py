"""`python -m pipeline.list` keeps working: it runs `python -m pipeline.cli.ls`."""
import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.cli.ls", run_name="__main__", alter_sys=True)
