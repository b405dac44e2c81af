"""Fine-tuning: SaRA sparse fine-tuning, condition-embedding perturbation, timestep curricula."""
from fewstep.finetune.cep import ConditionPerturbation, perturb_condition
from fewstep.finetune.curriculum import TimestepCurriculum
from fewstep.finetune.sara import SaRA, load_sara_state_dict, sara_state_dict
from fewstep.finetune.selection import TensorSelection, smallest_magnitude_threshold

__all__ = ["ConditionPerturbation", "SaRA", "TensorSelection", "TimestepCurriculum", "load_sara_state_dict",
           "perturb_condition", "sara_state_dict", "smallest_magnitude_threshold"]
