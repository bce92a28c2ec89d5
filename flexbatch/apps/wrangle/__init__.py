"""Data wrangling with few-shot prompts (entity matching, error detection, imputation), run as
durable batch jobs: `flexbatch wrangle` on the command line, or

    from flexbatch import LLM
    from flexbatch.apps.wrangle import TASKS, WrangleSettings, match_items, split, wrangle
    pool, asked = split(match_items("left.csv", "right.csv", "pairs.csv"), pool_size=20, limit=None)
    print(wrangle(LLM(), TASKS["match"], asked, pool, "work/", WrangleSettings(shots=3)))
"""
from .runner import WrangleSettings, wrangle
from .tables import detect_items, impute_items, match_items, split
from .tasks import TASKS, Item, Task

__all__ = ["TASKS", "Item", "Task", "WrangleSettings", "detect_items", "impute_items", "match_items", "split",
           "wrangle"]
