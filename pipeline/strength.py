"""`python -m pipeline.strength` keeps working: it runs `python -m pipeline.cli.strength`."""
import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.cli.strength", run_name="__main__", alter_sys=True)
