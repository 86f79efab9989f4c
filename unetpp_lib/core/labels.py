"""Label values and their names: as MSD Task03's dataset.json has them, and the words the kit shows."""
from __future__ import annotations

MSD_LABELS = {"0": "background", "1": "liver", "2": "cancer"}  # Task03_Liver's dataset.json, as released
NAMES = {"1": "liver", "2": "tumour"}  # what every table, picture and log line calls labels 1 and 2


def shown_name(label: int | str, dataset_name: str | None = None) -> str:
    """The word the kit shows for a label: Task03's own ("liver", "tumour" for its "cancer"); a dataset in the
    same layout with other classes keeps its dataset.json name (`class k` when it has none)."""
    key = str(label)
    if dataset_name is None or MSD_LABELS.get(key) == dataset_name:
        return NAMES.get(key, dataset_name or f"class {key}")
    return dataset_name
