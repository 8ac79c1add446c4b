"""`python -m pipeline.push` keeps working: it runs `python -m pipeline.cli.push`."""
import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.cli.push", run_name="__main__", alter_sys=True)
