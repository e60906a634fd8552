"""llr_optax: layer-wise learning rates (and weight decay) as optax transformations.

Chain any of the LR methods after the whole base optimizer:

    tx = optax.chain(optax.adamw(lr, weight_decay=0.1), llr_optax.scale_by_alpha_hill(total_steps=T))
"""

from llr_optax._alpha_decay import ALPHA_DECAY_RELEASED as ALPHA_DECAY_RELEASED
from llr_optax._alpha_decay import AddDecayedWeightsByAlphaHillState as AddDecayedWeightsByAlphaHillState
from llr_optax._alpha_decay import add_decayed_weights_by_alpha_hill as add_decayed_weights_by_alpha_hill
from llr_optax._alpha_decay import adamw_alpha_decay as adamw_alpha_decay
from llr_optax._alpha_hill import PAPER as ALPHA_HILL_PAPER
from llr_optax._alpha_hill import RELEASED_130M as ALPHA_HILL_RELEASED_130M
from llr_optax._alpha_hill import ScaleByAlphaHillState as ScaleByAlphaHillState
from llr_optax._alpha_hill import alpha_hill_plan_summary as alpha_hill_plan_summary
from llr_optax._alpha_hill import scale_by_alpha_hill as scale_by_alpha_hill
from llr_optax._init_grad import ScaleByInitGradState as ScaleByInitGradState
from llr_optax._init_grad import fan_in_init as fan_in_init
from llr_optax._init_grad import init_grad_scales as init_grad_scales
from llr_optax._init_grad import scale_by_init_grad as scale_by_init_grad
from llr_optax._labels import DEFAULT_RULES as DEFAULT_RULES
from llr_optax._labels import LABEL_GROUPS as LABEL_GROUPS
from llr_optax._labels import LABELS as LABELS
from llr_optax._labels import label_params as label_params
from llr_optax._matrix_axes import MatrixAxes as MatrixAxes
from llr_optax._matrix_axes import infer_matrix_axes as infer_matrix_axes
from llr_optax._matrix_axes import muon_dimension_numbers as muon_dimension_numbers
from llr_optax._metrics import SPECTRAL_METRICS as SPECTRAL_METRICS
from llr_optax._metrics import spectral_metrics as spectral_metrics
from llr_optax._relative import BLOCKWISE_FINAL_FRACTION as BLOCKWISE_FINAL_FRACTION
from llr_optax._relative import BLOCKWISE_MULTIPLIERS as BLOCKWISE_MULTIPLIERS
from llr_optax._relative import DENSE_FINAL_FRACTION as DENSE_FINAL_FRACTION
from llr_optax._relative import DENSE_MULTIPLIERS as DENSE_MULTIPLIERS
from llr_optax._relative import MOE_FINAL_FRACTION as MOE_FINAL_FRACTION
from llr_optax._relative import MOE_MULTIPLIERS as MOE_MULTIPLIERS
from llr_optax._relative import RelativeScheduleState as RelativeScheduleState
from llr_optax._relative import cosine_progress as cosine_progress
from llr_optax._relative import relative_base_schedule as relative_base_schedule
from llr_optax._relative import relative_schedule as relative_schedule
from llr_optax._relative import warmup_steps_for as warmup_steps_for
from llr_optax._relative import wsd_progress as wsd_progress
from llr_optax._scales import current_scales as current_scales
from llr_optax._scales import current_weight_decays as current_weight_decays
from llr_optax._scales import last_alphas as last_alphas
from llr_optax._spectral import esd as esd
from llr_optax._spectral import grouped_matrix_alphas as grouped_matrix_alphas
from llr_optax._spectral import hill_alpha as hill_alpha
from llr_optax._spectral import matrix_alpha as matrix_alpha

__version__ = "0.2.0"

# The public API, documented entry by entry in docs/api.md (tests/test_docs.py keeps the two in
# sync: every name here needs an entry there, with the signature the code has).
__all__ = [
    # transformations
    "scale_by_alpha_hill", "relative_schedule", "relative_base_schedule", "scale_by_init_grad",
    "init_grad_scales", "fan_in_init", "add_decayed_weights_by_alpha_hill", "adamw_alpha_decay",
    # spectral estimation and diagnostics
    "esd", "hill_alpha", "matrix_alpha", "grouped_matrix_alphas", "spectral_metrics",
    "SPECTRAL_METRICS",
    # labels, matrix axes, who takes part
    "label_params", "LABELS", "LABEL_GROUPS", "DEFAULT_RULES", "MatrixAxes", "infer_matrix_axes",
    "muon_dimension_numbers", "alpha_hill_plan_summary",
    # reading state
    "current_scales", "last_alphas", "current_weight_decays", "ScaleByAlphaHillState",
    "RelativeScheduleState", "ScaleByInitGradState", "AddDecayedWeightsByAlphaHillState",
    # helpers and constants
    "cosine_progress", "warmup_steps_for", "wsd_progress", "ALPHA_HILL_PAPER",
    "ALPHA_HILL_RELEASED_130M", "ALPHA_DECAY_RELEASED", "DENSE_MULTIPLIERS", "DENSE_FINAL_FRACTION", "MOE_MULTIPLIERS",
    "MOE_FINAL_FRACTION", "BLOCKWISE_MULTIPLIERS", "BLOCKWISE_FINAL_FRACTION",
]
