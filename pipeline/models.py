"""`python -m pipeline.models` keeps working: it runs `python -m pipeline.core.models`."""
import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.core.models", run_name="__main__", alter_sys=True)
