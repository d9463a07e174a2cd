"""otel-dl semantic conventions: every attribute, span and metric name, defined once.

Attribute names are a public contract. Dashboards, TraceQL queries, Jaeger tag
searches and the otel-dl collector all depend on them, so a name is never renamed,
only added. ``docs/semantic-conventions.md`` lists the same names with type, unit,
meaning and an example, and a test fails when the two disagree.

Use the constants rather than string literals::

    from otel_dl import semconv
    span.set_attribute(semconv.DL_DRIFT_SCORE, 0.31)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class AttributeSpec:
    """One attribute of the contract: its name, type, UCUM unit and meaning."""

    name: str
    type: str  # "string", "int", "double", "boolean" or "string[]"
    unit: str  # UCUM unit, "" where the value is not a quantity
    brief: str


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name, instrument kind, UCUM unit and meaning."""

    name: str
    instrument: str  # "counter", "histogram", "gauge" or "updowncounter"
    unit: str
    brief: str


ATTRIBUTES: dict[str, AttributeSpec] = {}
METRICS: dict[str, MetricSpec] = {}


def _attr(name: str, type_: str, unit: str, brief: str) -> str:
    if name in ATTRIBUTES:
        raise ValueError(f"attribute {name!r} is defined twice in otel_dl.semconv")
    ATTRIBUTES[name] = AttributeSpec(name, type_, unit, brief)
    return name


def _metric(name: str, instrument: str, unit: str, brief: str) -> str:
    if name in METRICS:
        raise ValueError(f"metric {name!r} is defined twice in otel_dl.semconv")
    METRICS[name] = MetricSpec(name, instrument, unit, brief)
    return name


# --- Where the span sits in the pipeline -------------------------------------------------
DL_STAGE: Final = _attr("dl.stage", "string", "", "pipeline stage, one of the STAGE_* values")
DL_COMPONENT: Final = _attr(
    "dl.component", "string", "", "what emitted the span, one of the COMPONENT_* values"
)

# --- Provenance ---------------------------------------------------------------------------
DL_DATA_SOURCE: Final = _attr("dl.data.source", "string", "", "URI or name of the data source")
DL_DATA_VERSION: Final = _attr(
    "dl.data.version", "string", "", "dataset or source version, where known"
)
DL_DATA_FINGERPRINT: Final = _attr(
    "dl.data.fingerprint", "string", "", "hex digest identifying the data (batch or dataset)"
)
DL_DATA_SCHEMA_FINGERPRINT: Final = _attr(
    "dl.data.schema.fingerprint",
    "string",
    "",
    "hex digest of column names, dtypes and trailing shape",
)
DL_DATA_ROWS: Final = _attr("dl.data.rows", "int", "{row}", "rows read from the source")
DL_DATA_BYTES: Final = _attr("dl.data.bytes", "int", "By", "bytes read from the source")
DL_DATASET_CLASS: Final = _attr(
    "dl.dataset.class", "string", "", "qualified class name of the dataset object"
)
DL_BATCH_INDEX: Final = _attr(
    "dl.batch.index", "int", "", "position of the batch in its iteration, from 0"
)
DL_BATCH_SIZE: Final = _attr("dl.batch.size", "int", "{row}", "rows in the batch")
DL_MODEL_NAME: Final = _attr("dl.model.name", "string", "", "which model answered")
DL_MODEL_VERSION: Final = _attr("dl.model.version", "string", "", "version of the model")
DL_MODEL_FINGERPRINT: Final = _attr(
    "dl.model.fingerprint", "string", "", "hex digest of the model weights or file"
)
DL_MODEL_FRAMEWORK: Final = _attr(
    "dl.model.framework", "string", "", "framework that ran the model, e.g. torch, onnxruntime"
)
DL_MODEL_PATH: Final = _attr(
    "dl.model.path", "string", "", "file the model was loaded from, where known"
)
DL_MODEL_CLASS: Final = _attr("dl.model.class", "string", "", "qualified class of the model object")
DL_MODEL_METHOD: Final = _attr(
    "dl.model.method", "string", "", "model method called, e.g. predict_proba"
)
DL_MODEL_STEPS: Final = _attr(
    "dl.model.steps", "string[]", "", "class names of a pipeline's steps, in order"
)
DL_MODEL_TASK: Final = _attr("dl.model.task", "string", "", "Hugging Face pipeline task")
DL_MODEL_EXECUTION_PROVIDERS: Final = _attr(
    "dl.model.execution_providers",
    "string[]",
    "",
    "ONNX Runtime execution providers of the session, in priority order",
)
DL_CODE_VERSION: Final = _attr(
    "dl.code.version",
    "string",
    "",
    "resource attribute: version of the user's code (code_version, OTEL_DL_CODE_VERSION, or"
    " the git commit when available)",
)

# --- Feature store ------------------------------------------------------------------------
DL_FEATURE_VIEWS: Final = _attr(
    "dl.feature.views", "string[]", "", "feature views or feature service read"
)
DL_FEATURE_FRESHNESS: Final = _attr(
    "dl.feature.freshness", "double", "s", "age of the oldest feature value returned"
)
DL_FEATURE_PROJECT: Final = _attr("dl.feature.project", "string", "", "Feast project")
DL_FEATURE_SERVICE: Final = _attr("dl.feature.service", "string", "", "feature service read")
DL_FEATURE_REGISTRY: Final = _attr(
    "dl.feature.registry", "string", "", "feature registry path or URI"
)
DL_FEATURE_VIEW_FINGERPRINTS: Final = _attr(
    "dl.feature.view.fingerprints",
    "string[]",
    "",
    "`view:digest` of each feature view's registered definition",
)
DL_FEATURE_VIEW_VERSIONS: Final = _attr(
    "dl.feature.view.versions", "string[]", "", "`view:vN`, where the store versions views"
)
DL_FEATURE_ENTITY_COUNT: Final = _attr(
    "dl.feature.entity_count", "int", "{entity}", "entities requested"
)
DL_FEATURE_MISSING_FRACTION: Final = _attr(
    "dl.feature.missing_fraction",
    "double",
    "1",
    "share of returned feature values that are missing",
)
DL_FEATURE_TTL: Final = _attr(
    "dl.feature.ttl", "double", "s", "smallest TTL of the feature views read"
)
DL_FEATURE_STALE: Final = _attr(
    "dl.feature.stale", "boolean", "", "a value read is older than its own view's TTL"
)
DL_FEATURE_MATERIALIZE_START: Final = _attr(
    "dl.feature.materialize.start", "string", "", "start of the materialisation window, ISO 8601"
)
DL_FEATURE_MATERIALIZE_END: Final = _attr(
    "dl.feature.materialize.end", "string", "", "end of the materialisation window, ISO 8601"
)
DL_FEATURE_PUSH_SOURCE: Final = _attr("dl.feature.push_source", "string", "", "push source written")

# --- Drift --------------------------------------------------------------------------------
DL_DRIFT_SCORE: Final = _attr(
    "dl.drift.score",
    "double",
    "1",
    "score of dl.drift.feature under dl.drift.method (the worst beyond chance, else the worst)",
)
DL_DRIFT_METHOD: Final = _attr(
    "dl.drift.method", "string", "", "drift statistic: psi, js, ks or wasserstein"
)
DL_DRIFT_FEATURE: Final = _attr(
    "dl.drift.feature", "string", "", "the feature that decides dl.drift.status"
)
DL_DRIFT_STATUS: Final = _attr(
    "dl.drift.status",
    "string",
    "",
    "ok, warn or alert against the configured thresholds, for scores beyond chance",
)
DL_DRIFT_WINDOW_ROWS: Final = _attr(
    "dl.drift.window_rows",
    "int",
    "{row}",
    "rows in the drift window the score covers (the latest completed score)",
)

# --- Data quality -------------------------------------------------------------------------
DL_QUALITY_NAN_FRACTION: Final = _attr(
    "dl.quality.nan_fraction", "double", "1", "share of NaN/Inf values in the batch"
)
DL_QUALITY_NAN_EXCESS_FRACTION: Final = _attr(
    "dl.quality.nan_excess_fraction",
    "double",
    "1",
    "share of NaN/Inf values beyond what the reference's per-feature missing shares explain",
)
DL_QUALITY_OUT_OF_RANGE_FRACTION: Final = _attr(
    "dl.quality.out_of_range_fraction",
    "double",
    "1",
    "share of values outside the reference range",
)
DL_QUALITY_OUT_OF_RANGE_EXCESS_FRACTION: Final = _attr(
    "dl.quality.out_of_range_excess_fraction",
    "double",
    "1",
    "share of values outside the reference range beyond what chance explains",
)
#: Each ``*_excess_fraction`` attribute, and the share that readers (signal-aware
#: sampling, the guard, the collector) judge a span by when it lacks that attribute.
EXCESS_OF: Final = {
    DL_QUALITY_NAN_EXCESS_FRACTION: DL_QUALITY_NAN_FRACTION,
    DL_QUALITY_OUT_OF_RANGE_EXCESS_FRACTION: DL_QUALITY_OUT_OF_RANGE_FRACTION,
}
DL_QUALITY_SCHEMA_MISMATCH: Final = _attr(
    "dl.quality.schema_mismatch", "boolean", "", "schema differs from the reference"
)

# --- Confidence ---------------------------------------------------------------------------
DL_CONFIDENCE_MEAN: Final = _attr(
    "dl.confidence.mean", "double", "1", "mean max-class probability over the batch"
)
DL_CONFIDENCE_MIN: Final = _attr(
    "dl.confidence.min", "double", "1", "lowest max-class probability in the batch"
)
DL_CONFIDENCE_MARGIN_MEAN: Final = _attr(
    "dl.confidence.margin.mean", "double", "1", "mean of top-1 minus top-2 probability"
)
DL_CONFIDENCE_ENTROPY_MEAN: Final = _attr(
    "dl.confidence.entropy.mean", "double", "nat", "mean predictive entropy"
)
DL_CONFIDENCE_LOW_FRACTION: Final = _attr(
    "dl.confidence.low_fraction",
    "double",
    "1",
    "share of predictions under the confidence threshold",
)
DL_PREDICTION_COUNT: Final = _attr(
    "dl.prediction.count", "int", "{prediction}", "predictions in the call"
)
DL_CONFIDENCE_ROWS: Final = _attr(
    "dl.confidence.rows",
    "int",
    "{prediction}",
    "predictions the dl.confidence.* figures cover (evenly spaced when fewer than the call's)",
)

# --- Sampling ---------------------------------------------------------------------------
DL_SAMPLING_RATE: Final = _attr(
    "dl.sampling.rate",
    "int",
    "1",
    "spans this kept span stands for under signal-aware sampling: 1 if abnormal, else N"
    " (absent when no SignalAwareSpanProcessor samples)",
)

# --- Guard (otel_dl.guard), on the model's span and the span current at the call ---------
DL_GUARD_STATE: Final = _attr(
    "dl.guard.state", "string", "", "circuit-breaker state at the call: closed, open or half_open"
)
DL_GUARD_ACTION: Final = _attr(
    "dl.guard.action", "string", "", "who answered the call: model, fallback or probe"
)
DL_GUARD_REASON: Final = _attr(
    "dl.guard.reason", "string", "", "the guard policy rule the call's signals tripped"
)

# --- Fault attribution, written by the otel-dl collector ----------------------------------
DL_FAULT_ROOT_CAUSE: Final = _attr(
    "dl.fault.root_cause", "boolean", "", "true on the span that caused the trace's fault"
)
DL_FAULT_KIND: Final = _attr(
    "dl.fault.kind", "string", "", "kind of fault, one of the FAULT_KIND_* values"
)
DL_FAULT_ORIGIN: Final = _attr("dl.fault.origin", "string", "", "internal or external")
DL_FAULT_MODE: Final = _attr("dl.fault.mode", "string", "", "id of the failure mode in the catalog")
DL_FAULT_SCORE: Final = _attr("dl.fault.score", "double", "1", "0..1, how sure the attribution is")
DL_FAULT_SEVERITY: Final = _attr(
    "dl.fault.severity", "string", "", "severity of the failure mode, from the catalog"
)
DL_FAULT_OWNER: Final = _attr(
    "dl.fault.owner", "string", "", "team that owns the failure mode, from the catalog"
)
DL_FAULT_RUNBOOK: Final = _attr(
    "dl.fault.runbook", "string", "", "runbook or rollback link of the failure mode"
)
DL_FAULT_SYMPTOM: Final = _attr(
    "dl.fault.symptom", "boolean", "", "true on spans where the fault showed"
)
DL_FAULT_ROOT_CAUSE_SERVICE: Final = _attr(
    "dl.fault.root_cause.service",
    "string",
    "",
    "service of the root-cause span, on symptom spans and the trace's root span",
)
DL_FAULT_ROOT_CAUSE_SPAN_ID: Final = _attr(
    "dl.fault.root_cause.span_id",
    "string",
    "",
    "hex span id of the root-cause span, on symptom spans and the trace's root span",
)
DL_FAULT_CANDIDATES: Final = _attr(
    "dl.fault.candidates",
    "string[]",
    "",
    "services ranked as likely cause, most likely first (up to 5), on the trace's root span",
)
DL_FAULT_BLAME: Final = _attr(
    "dl.fault.blame",
    "string",
    "",
    "what the root-cause span stands for: self, link or dependency, on the root-cause span",
)

# --- Standard OpenTelemetry GenAI attributes, on text-generation spans --------------------
GEN_AI_OPERATION_NAME: Final = _attr(
    "gen_ai.operation.name", "string", "", "`chat` or `text_completion`"
)
GEN_AI_REQUEST_MODEL: Final = _attr(
    "gen_ai.request.model", "string", "", "the model's name or path"
)
GEN_AI_REQUEST_MAX_TOKENS: Final = _attr(
    "gen_ai.request.max_tokens", "int", "{token}", "max_new_tokens, when given"
)
GEN_AI_USAGE_INPUT_TOKENS: Final = _attr(
    "gen_ai.usage.input_tokens", "int", "{token}", "prompt tokens, padding excluded"
)
GEN_AI_USAGE_OUTPUT_TOKENS: Final = _attr(
    "gen_ai.usage.output_tokens",
    "int",
    "{token}",
    "generated tokens, up to and including the first end-of-sequence",
)

# --- Values -------------------------------------------------------------------------------
STAGE_INGEST: Final = "ingest"
STAGE_DATALOADER: Final = "dataloader"
STAGE_FEATURE_STORE: Final = "feature_store"
STAGE_PREPROCESS: Final = "preprocess"
STAGE_MODEL_LOAD: Final = "model_load"
STAGE_INFERENCE: Final = "inference"
STAGE_POSTPROCESS: Final = "postprocess"
STAGE_EXTERNAL: Final = "external"
STAGES: Final = (
    STAGE_INGEST,
    STAGE_DATALOADER,
    STAGE_FEATURE_STORE,
    STAGE_PREPROCESS,
    STAGE_MODEL_LOAD,
    STAGE_INFERENCE,
    STAGE_POSTPROCESS,
    STAGE_EXTERNAL,
)

COMPONENT_TORCH_DATALOADER: Final = "torch.dataloader"
COMPONENT_TORCH_NN: Final = "torch.nn"
COMPONENT_ONNXRUNTIME: Final = "onnxruntime"
COMPONENT_SKLEARN: Final = "sklearn"
COMPONENT_XGBOOST: Final = "xgboost"
COMPONENT_LIGHTGBM: Final = "lightgbm"
COMPONENT_TRANSFORMERS: Final = "transformers"
COMPONENT_FEAST: Final = "feast"
COMPONENT_INGEST: Final = "ingest"
COMPONENT_USER: Final = "user"

DRIFT_STATUS_OK: Final = "ok"
DRIFT_STATUS_WARN: Final = "warn"
DRIFT_STATUS_ALERT: Final = "alert"
DRIFT_STATUSES: Final = (DRIFT_STATUS_OK, DRIFT_STATUS_WARN, DRIFT_STATUS_ALERT)
DRIFT_METHODS: Final = ("psi", "js", "ks", "wasserstein")
DRIFT_THRESHOLDS: Final = {
    "psi": (0.1, 0.25),
    "js": (0.1, 0.2),
    "ks": (0.1, 0.2),
    "wasserstein": (0.1, 0.2),
}
"""The default (warn, alert) thresholds of dl.drift.score, per dl.drift.method."""


def drift_status(
    value: float, method: str, warn: float | None = None, alert: float | None = None
) -> str:
    """``alert`` at or above the alert threshold, ``warn`` at or above warn, else ``ok``;
    the thresholds default to :data:`DRIFT_THRESHOLDS` of ``method``."""
    default_warn, default_alert = DRIFT_THRESHOLDS[method]
    if value >= (default_alert if alert is None else alert):
        return DRIFT_STATUS_ALERT
    if value >= (default_warn if warn is None else warn):
        return DRIFT_STATUS_WARN
    return DRIFT_STATUS_OK


FAULT_KIND_DATA_DRIFT: Final = "data_drift"
FAULT_KIND_DATA_QUALITY: Final = "data_quality"
FAULT_KIND_SCHEMA_MISMATCH: Final = "schema_mismatch"
FAULT_KIND_STALE_FEATURES: Final = "stale_features"
FAULT_KIND_MODEL_CHANGE: Final = "model_change"
FAULT_KIND_LOW_CONFIDENCE: Final = "low_confidence"
FAULT_KIND_LATENCY: Final = "latency"
FAULT_KIND_ERROR: Final = "error"
FAULT_KIND_DEPENDENCY_OUTAGE: Final = "dependency_outage"
FAULT_KINDS: Final = (
    FAULT_KIND_DATA_DRIFT,
    FAULT_KIND_DATA_QUALITY,
    FAULT_KIND_SCHEMA_MISMATCH,
    FAULT_KIND_STALE_FEATURES,
    FAULT_KIND_MODEL_CHANGE,
    FAULT_KIND_LOW_CONFIDENCE,
    FAULT_KIND_LATENCY,
    FAULT_KIND_ERROR,
    FAULT_KIND_DEPENDENCY_OUTAGE,
)
FAULT_ORIGIN_INTERNAL: Final = "internal"
FAULT_ORIGIN_EXTERNAL: Final = "external"
#: The root-cause span's own work is the cause.
FAULT_BLAME_SELF: Final = "self"
#: The call into the root-cause span (a callee's server span) is slow while that span is
#: not: the network between caller and callee, or the callee's queue before it handled
#: the call (a paused or starved process). Never the caller's own work.
FAULT_BLAME_LINK: Final = "link"
#: An untraced dependency named by the root-cause client span's peer.
FAULT_BLAME_DEPENDENCY: Final = "dependency"
FAULT_BLAMES: Final = (FAULT_BLAME_SELF, FAULT_BLAME_LINK, FAULT_BLAME_DEPENDENCY)

GUARD_STATE_CLOSED: Final = "closed"
GUARD_STATE_OPEN: Final = "open"
GUARD_STATE_HALF_OPEN: Final = "half_open"
GUARD_STATES: Final = (GUARD_STATE_CLOSED, GUARD_STATE_OPEN, GUARD_STATE_HALF_OPEN)
GUARD_ACTION_MODEL: Final = "model"
GUARD_ACTION_FALLBACK: Final = "fallback"
GUARD_ACTION_PROBE: Final = "probe"
GUARD_ACTIONS: Final = (GUARD_ACTION_MODEL, GUARD_ACTION_FALLBACK, GUARD_ACTION_PROBE)

# --- Span names ---------------------------------------------------------------------------
# Low-cardinality: the model or dataset goes in attributes, never in the name.
SPAN_DATALOADER_BATCH: Final = "dataloader.batch"
SPAN_INFERENCE: Final = "inference"
SPAN_MODEL_LOAD: Final = "model.load"
SPAN_FEATURE_STORE_PREFIX: Final = "feature_store."
SPAN_INGEST_PREFIX: Final = "ingest."

# --- Metrics ------------------------------------------------------------------------------
# Units are UCUM and never part of the name; attributes are low-cardinality only
# (service, dl.stage, dl.component, dl.model.name and, under a cap, the feature).
METRIC_OPERATION_DURATION: Final = _metric(
    "dl.operation.duration", "histogram", "s", "duration of each otel-dl span's operation"
)
METRIC_INTERNAL_ERRORS: Final = _metric(
    "otel_dl.internal.errors",
    "counter",
    "{error}",
    "exceptions raised inside otel-dl instrumentation and swallowed by its guard",
)
METRIC_EXPORT_DROPPED_SPANS: Final = _metric(
    "otel_dl.export.dropped_spans",
    "counter",
    "{span}",
    "finished spans dropped because the span export queue was full",
)
