"""v1's aggregate_scores (NiftiEvaluator, default metrics) on the test's prediction/reference pairs, per label set."""
import _ref

a = _ref.args()
import json  # noqa: E402

from nnunet.evaluation.evaluator import aggregate_scores  # noqa: E402

result = {}
for i, labels in enumerate(a["label_sets"]):
    out = f"{a['out']}/summary_{i}.json"
    aggregate_scores(a["pairs"], labels=labels, json_output_file=out, json_name="parity", json_task="Task03",
                     num_threads=1)
    with open(out) as f:
        result[str(i)] = json.load(f)
_ref.done(a, result)
