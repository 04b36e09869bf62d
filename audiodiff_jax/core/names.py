"""Names used across the code base: logical axes of arrays and metric names.

Every parameter of the model carries a tuple of logical axis names (one per array
dimension); :data:`audiodiff_jax.core.sharding.LOGICAL_RULES` maps them to mesh axes. Metric
names are the keys written to TensorBoard and to the absl log.
"""

# Mesh axes (docs/DESIGN.md): data parallel, fully-sharded data parallel, sequence, tensor.
MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# Logical axes of activations.
BATCH = "batch"
LENGTH = "length"  # latent frames
TEXT_LENGTH = "text_length"  # caption tokens
ACT_EMBED = "act_embed"  # model width of activations (replicated)
ACT_HEADS = "act_heads"
ACT_MLP = "act_mlp"

# Logical axes of parameters.
EMBED = "embed"  # model width
MLP = "mlp"  # hidden width of the MLP
HEADS = "heads"  # attention heads
HEAD_DIM = "head_dim"
LATENT = "latent"  # latent channels of the codec
VOCAB = "vocab"  # sentencepiece vocabulary
COND = "cond"  # conditioning (sinusoidal frequency) features
MODULATION = "modulation"  # AdaLN shift/scale/gate chunks
NORM = "norm"  # scales of normalization layers
ADAPTER_RANK = "adapter_rank"  # the rank of a low-rank adapter (A [.., rank], B [rank, ..])

# Metric names.
TRAIN_LOSS = "train/loss"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_PARAM_NORM = "train/param_norm"
TRAIN_UPDATE_NORM = "train/update_norm"
TRAIN_LR = "train/learning_rate"
PERF_STEP_TIME = "perf/step_time_s"
PERF_FRAMES_PER_SEC = "perf/latent_frames_per_s"
PERF_TFLOPS = "perf/model_tflops_per_s_per_device"
PERF_MFU = "perf/mfu"
EVAL_LOSS = "eval/loss"  # validation v-loss of the sampling weights, mean over time buckets
EVAL_TIME = "eval/seconds"

# Device memory (core/memory.py): per local device of process 0, where the backend
# reports it (``Device.memory_stats``; absent, never zero, where it does not), with the
# device's id in place of {}; and the largest of them.
MEMORY_IN_USE = "memory/bytes_in_use/device_{}"
MEMORY_PEAK = "memory/peak_bytes_in_use/device_{}"
MEMORY_IN_USE_MAX = "memory/bytes_in_use_max"
MEMORY_PEAK_MAX = "memory/peak_bytes_in_use_max"
MEMORY_LIMIT = "memory/bytes_limit"  # what one device has (the smallest of them)
# The compiled train step's own memory analysis, per device, written once at start-up.
COMPILED_ARGUMENTS = "memory/compiled_step/argument_bytes"
COMPILED_OUTPUTS = "memory/compiled_step/output_bytes"
COMPILED_ALIASED = "memory/compiled_step/alias_bytes"
COMPILED_TEMPORARIES = "memory/compiled_step/temp_bytes"
COMPILED_CODE = "memory/compiled_step/generated_code_bytes"
COMPILED_TOTAL = "memory/compiled_step/total_bytes"
