"""DeepSpeed's defaults for absent config keys, written once (standard library only, imported at start-up).

Read from the deepspeed 0.19.8 wheel; each value names the file and field it comes from. Sizes are element
counts, as DeepSpeed's config uses them (pp_int(5e8) is the int 500000000).
"""

from __future__ import annotations

DEEPSPEED_VERSION_READ = "0.19.8"

# deepspeed/runtime/zero/config.py, class DeepSpeedZeroConfig (pydantic fields).
ZERO_STAGE = 0  # stage: ZeroStageEnum = 0
CONTIGUOUS_GRADIENTS = True  # contiguous_gradients: bool = True
REDUCE_BUCKET_SIZE = 500_000_000  # reduce_bucket_size = Field(pp_int(5e8), gt=0)
ALLGATHER_BUCKET_SIZE = 500_000_000  # allgather_bucket_size = Field(pp_int(5e8), ge=0)
PREFETCH_BUCKET_SIZE = 50_000_000  # prefetch_bucket_size (alias stage3_prefetch_bucket_size) = pp_int(5e7)
PARAM_PERSISTENCE_THRESHOLD = 100_000  # param_persistence_threshold (alias stage3_...) = pp_int(1e5)
MAX_LIVE_PARAMETERS = 1_000_000_000  # max_live_parameters (alias stage3_max_live_parameters) = pp_int(1e9)
MAX_REUSE_DISTANCE = 1_000_000_000  # max_reuse_distance (alias stage3_max_reuse_distance) = pp_int(1e9)
SUB_GROUP_SIZE = 1_000_000_000  # sub_group_size = Field(pp_int(1e9), ge=0)
# overlap_comm: Optional[bool] = None; validator overlap_comm_valid sets it to (stage == 3).


def overlap_comm(stage: int) -> bool:
    """DeepSpeedZeroConfig.overlap_comm_valid: an absent overlap_comm is True at stage 3 only."""
    return stage == 3


# deepspeed/runtime/zero/offload_config.py: device: OffloadDeviceEnum = "none" (none | cpu | nvme); ratio = 1.0.
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
OFFLOAD_RATIO = 1.0
# deepspeed/runtime/constants.py: GRADIENT_CLIPPING_DEFAULT = 1.0 (0.0 in older releases).
GRADIENT_CLIPPING = 1.0
# deepspeed/runtime/config.py, DeepSpeedConfig._set_batch_related_parameters: 1 when only one of
# train_batch_size / train_micro_batch_size_per_gpu is given.
GRADIENT_ACCUMULATION_STEPS = 1
