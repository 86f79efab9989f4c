"""v1's save_segmentation_nifti_from_softmax (order 1, force_separate_z None, order_z 0: what v1's validation uses
with v2.1 plans) on the test's probabilities and properties."""
import _ref

a = _ref.args()
import numpy as np  # noqa: E402
from nnunet.inference.segmentation_export import save_segmentation_nifti_from_softmax  # noqa: E402

for case in a["cases"]:
    p = case["properties"]
    props = {"original_size_of_raw_data": np.array(p["original_size_of_raw_data"]),
             "size_after_cropping": tuple(p["size_after_cropping"]), "crop_bbox": p["crop_bbox"],
             "original_spacing": np.array(p["original_spacing"]),
             "spacing_after_resampling": np.array(p["spacing_after_resampling"]),
             "itk_spacing": tuple(p["itk_spacing"]), "itk_origin": tuple(p["itk_origin"]),
             "itk_direction": tuple(p["itk_direction"])}
    save_segmentation_nifti_from_softmax(np.load(case["probs"]), case["out"], props, 1, None, None, None,
                                         case["out"][:-len(".nii.gz")] + ".npz", None, None, 0, verbose=False)
_ref.done(a, {"n": len(a["cases"])})
