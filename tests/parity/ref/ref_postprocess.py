"""v1's determine_postprocessing on the test's folders, and its largest-component removal on the test's label maps."""
import _ref

a = _ref.args()
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
from nnunet.evaluation.evaluator import aggregate_scores  # noqa: E402
from nnunet.postprocessing.connected_components import (determine_postprocessing,  # noqa: E402
                                                        remove_all_but_the_largest_connected_component)

result = {"decisions": {}}
for name, sc in a["scenarios"].items():
    raw = os.path.join(sc["base"], "validation_raw")
    pairs = [[os.path.join(raw, f), os.path.join(sc["gt"], f)] for f in sorted(os.listdir(raw))]
    # as v1's validation does before deciding: summary.json of the raw predictions over all labels
    aggregate_scores(pairs, labels=[0, 1, 2], json_output_file=os.path.join(raw, "summary.json"), num_threads=1)
    determine_postprocessing(sc["base"], sc["gt"], "validation_raw", final_subf_name="validation_final", processes=1)
    with open(os.path.join(sc["base"], "postprocessing.json")) as f:
        result["decisions"][name] = json.load(f)

for i, m in enumerate(a["label_maps"]):
    seg = np.load(m)
    joint = remove_all_but_the_largest_connected_component(seg.copy(), [(1, 2)], 1.0, None)[0]
    per_class = remove_all_but_the_largest_connected_component(seg.copy(), [1, 2], 1.0, None)[0]
    _ref.save_array(a, f"joint_{i}", joint)
    _ref.save_array(a, f"per_class_{i}", per_class)
_ref.done(a, result)
