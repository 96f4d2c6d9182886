"""splitgate's names on the wire: every ``splitgate.*`` parameter and extension, defined once.

splitgate speaks the Open Inference Protocol v2 unchanged; what it adds rides
in the ``parameters`` maps of requests and responses (and, where OIP has no
parameters, in ``ServerMetadata.extensions``). Edge, cloud, benchmarks and
load tests import these names from here, never spell them out.
"""

from __future__ import annotations

__all__ = [
    "PARTITION",
    "PLAN_DIGEST",
    "CLOUD_MS",
    "QUEUE_DEPTH",
    "BATCH_SIZE",
    "DEADLINE_MS",
    "PRIORITY",
    "RETRY_AFTER_MS",
    "PRIVATE",
    "CALLER",
    "CALLER_METADATA",
    "VERSION",
    "CASCADE",
    "DEVICE_MS",
    "NETWORK_MS",
    "TOTAL_MS",
    "BYTES_SENT",
    "FALLBACK",
    "DEVICE_FACTOR",
    "ENCODING",
    "SCALE",
    "ZERO_POINT",
    "OFFSET",
    "AXIS",
    "DATATYPE",
    "SHAPE",
    "PROBE_MODEL",
    "ENDPOINTS_EXTENSION",
    "PROVIDERS_EXTENSION",
    "DEFAULT_PARTITION",
]

# -- request parameters: edge -> cloud -----------------------------------------------
#: which suffix to run (``cloud`` = the whole model, the default; ``cut-K``, ``dag-K``).
PARTITION = "splitgate.partition"
#: the plan the edge holds; the cloud refuses a digest it does not serve.
PLAN_DIGEST = "splitgate.plan_digest"

#: OIP's (Triton's) request priority: 1 is served first, larger numbers later; 0 or
#: absent = the tier's default level (the cloud serves its queue in this order).
PRIORITY = "priority"

# -- request parameters: app -> edge server, edge -> cloud ----------------------------
#: a per-request deadline in ms: the app's budget at the edge server; the edge sends
#: the budget left to the cloud, which refuses work it cannot finish in time.
DEADLINE_MS = "splitgate.deadline_ms"
#: keep raw inputs on the device (bool).
PRIVATE = "splitgate.private"
#: the caller's key (a user or device id): a staged rollout assigns each caller
#: to one version for the whole rollout (``Gateway.infer(..., caller=)``).
CALLER = "splitgate.caller"
#: gRPC metadata key carrying the same caller key (for clients that cannot set parameters).
CALLER_METADATA = "x-splitgate-caller"

# -- response parameters: cloud -> edge ------------------------------------------------
#: the suffix's compute time in the replica.
CLOUD_MS = "splitgate.cloud_ms"
#: ModelInfer calls in the replica (waiting or running, this one included) on arrival.
QUEUE_DEPTH = "splitgate.queue_depth"
#: rows of the onnxruntime run that served the request.
BATCH_SIZE = "splitgate.batch_size"
#: trailing-metadata key of an admission refusal (RESOURCE_EXHAUSTED: queue full;
#: UNAVAILABLE: would miss its deadline): ms after which the cloud expects to admit
#: work again. An edge finishes the request locally and sends no new work for that long.
RETRY_AFTER_MS = "splitgate.retry_after_ms"

# -- response parameters: edge server -> app ----------------------------------------------
DEVICE_MS = "splitgate.device_ms"
NETWORK_MS = "splitgate.network_ms"
TOTAL_MS = "splitgate.total_ms"
BYTES_SENT = "splitgate.bytes_sent"
#: why the request finished on the device (``""`` = it did not fall back).
FALLBACK = "splitgate.fallback"
#: the device's learned speed against the plan (1 = as profiled).
DEVICE_FACTOR = "splitgate.device_factor"
#: the model version that answered: the first 12 hex digits of its plan digest
#: (as ``ModelMetadata.versions``); differs from the stable one for a rollout's candidate.
VERSION = "splitgate.version"
#: what the bundle's confident-on-device cascade did: ``exit`` (the small device
#: model answered), ``partial`` (it answered the confident rows of a batch; the
#: partition answered the rest), ``through`` (it was not confident; the partition
#: answered) or ``""`` (no cascade, or it did not pay).
CASCADE = "splitgate.cascade"

# -- per-tensor parameters of an encoded cut tensor (:mod:`splitgate.encoding`) ----------
ENCODING = "splitgate.encoding"
SCALE = "splitgate.scale"
ZERO_POINT = "splitgate.zero_point"
#: the offset of a ``uint8`` (lossless 8-bit) tensor: value = code * scale + offset.
OFFSET = "splitgate.offset"
AXIS = "splitgate.axis"
DATATYPE = "splitgate.datatype"
SHAPE = "splitgate.shape"

# -- other names -----------------------------------------------------------------------
#: model name of the edge's bandwidth probe (the cloud answers NOT_FOUND after receiving it).
PROBE_MODEL = "splitgate.probe"
#: ``ServerMetadata.extensions`` entry listing replicas' direct gRPC endpoints (comma-separated).
ENDPOINTS_EXTENSION = "splitgate.endpoints="
#: ``ServerMetadata.extensions`` entry naming the onnxruntime execution providers
#: a replica's sessions run on (``splitgate.providers=CUDAExecutionProvider,...``).
PROVIDERS_EXTENSION = "splitgate.providers="
#: the partition a plain OIP client (no ``splitgate.partition``) gets.
DEFAULT_PARTITION = "cloud"
