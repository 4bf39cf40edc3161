"""The service's error hierarchy.

Errors carry a stable machine-readable ``code`` and a human ``detail``; HTTP status
codes are assigned only at the edge (``service.api.problems``). Detail strings must never
contain patient data (names, IDs, dates): they are logged and returned to clients.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Raised for any failure the service reports to a client."""

    code = "service_error"
    title = "Service error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, detail={self.detail!r})"


class BadInput(ServiceError):
    """Raised when an upload cannot be read as an image."""

    code = "bad_input"
    title = "Bad input"


class EmptyBody(BadInput):
    """Raised when a request carries no image bytes."""

    code = "empty_body"
    title = "Empty body"


class InvalidImage(BadInput):
    """Raised when PNG/JPEG bytes cannot be decoded."""

    code = "invalid_image"
    title = "Invalid image"


class InvalidDicom(BadInput):
    """Raised when a DICOM file is truncated, corrupt or its pixels cannot be decoded."""

    code = "invalid_dicom"
    title = "Invalid DICOM"


class InvalidMultipart(BadInput):
    """Raised when a multipart/form-data body is malformed or has no file part."""

    code = "invalid_multipart"
    title = "Invalid multipart body"


class InvalidContentEncoding(BadInput):
    """Raised when a compressed request body is not what its Content-Encoding says: not
    gzip or deflate data, truncated, followed by other bytes, or too many gzip members."""

    code = "invalid_content_encoding"
    title = "Invalid content encoding"


class InvalidInferenceRequest(BadInput):
    """Raised when a KServe V1 or Open Inference Protocol V2 request body is malformed
    (not JSON, a missing or mistyped member, a tensor whose data does not fit its shape)."""

    code = "invalid_inference_request"
    title = "Invalid inference request"


class TensorMismatch(InvalidInferenceRequest):
    """Raised when an Open Inference Protocol V2 FP32 tensor does not fit the model: its
    shape is not the network input's, its data do not fill its shape, or the model is an
    ensemble (each member has its own input)."""

    code = "tensor_mismatch"
    title = "Tensor does not fit the model"


class OutputNotComputed(InvalidInferenceRequest):
    """Raised when an Open Inference Protocol V2 request asks for an output its parameters
    do not compute (a method's map without that method in ``methods``)."""

    code = "output_not_computed"
    title = "Output not computed"


class UnsupportedMediaType(ServiceError):
    """Raised when the content type (or sniffed format) is not one the service decodes."""

    code = "unsupported_media_type"
    title = "Unsupported media type"


class DicomWithoutPixels(UnsupportedMediaType):
    """Raised when a DICOM object has no pixel data (SR, RTPLAN, waveform, ...)."""

    code = "dicom_without_pixels"
    title = "DICOM object without pixel data"


class UnsupportedTransferSyntax(UnsupportedMediaType):
    """Raised when no installed decoder handles a DICOM transfer syntax."""

    code = "unsupported_transfer_syntax"
    title = "Unsupported transfer syntax"


class NotAcceptable(ServiceError):
    """Raised when no representation the route produces matches the request's Accept header."""

    code = "not_acceptable"
    title = "Not acceptable"


class PayloadTooLarge(ServiceError):
    """Raised when an upload exceeds the byte or pixel-count limits."""

    code = "payload_too_large"
    title = "Payload too large"


class DecodeBudgetExceeded(PayloadTooLarge):
    """Raised when decoding an upload would take more memory than a request may use."""

    code = "decode_budget_exceeded"
    title = "Image too large to decode"


class InvalidParameter(ServiceError):
    """Raised when a request parameter has a bad value."""

    code = "invalid_parameter"
    title = "Invalid parameter"


class TooManyFrames(InvalidParameter):
    """Raised when a DICOM object has more frames than the service accepts."""

    code = "too_many_frames"
    title = "Too many frames"


class RepeatedParameter(InvalidParameter):
    """Raised when a parameter is given more than once (twice in the query, or as a query
    parameter and a form field): no value is silently preferred."""

    code = "repeated_parameter"
    title = "Repeated parameter"


class FrameOutOfRange(InvalidParameter):
    """Raised when ``frame`` names a frame the uploaded image does not have."""

    code = "frame_out_of_range"
    title = "Frame out of range"


class AnswerTooLarge(InvalidParameter):
    """Raised when the answer the parameters ask for would hold more than a request's answer
    may (service.outputs.limit)."""

    code = "answer_too_large"
    title = "Answer too large"


class IncompatibleParameters(InvalidParameter):
    """Raised when parameters that are each valid cannot be used together (size=feature
    with a method whose map is on the input grid, or with an ensemble)."""

    code = "incompatible_parameters"
    title = "Incompatible parameters"


class UnknownLabel(InvalidParameter):
    """Raised when a requested class is neither a label nor a valid index."""

    code = "unknown_label"
    title = "Unknown label"


class UnknownMethod(InvalidParameter):
    """Raised when a requested explanation method does not exist or is unavailable."""

    code = "unknown_method"
    title = "Unknown method"


class DicomNotAccepted(InvalidParameter):
    """Raised when a DICOM image is outside the model's accepted modalities, body parts,
    view positions or presentation intents (model.toml ``[accepts]``)."""

    code = "dicom_not_accepted"
    title = "DICOM image not accepted by the model"


class UnknownModel(ServiceError):
    """Raised when the requested model is not in the repository."""

    code = "unknown_model"
    title = "Unknown model"


class Unauthorized(ServiceError):
    """Raised when API keys are configured and the request has none or a wrong one."""

    code = "unauthorized"
    title = "Unauthorized"


class Overloaded(ServiceError):
    """Raised when the work queue is full; the client should retry later."""

    code = "overloaded"
    title = "Service overloaded"

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class Draining(Overloaded):
    """Raised for new work while the service drains before it stops (SIGTERM)."""

    code = "draining"
    title = "Service draining"


class ComputeTimeout(Overloaded):
    """Raised when a request's queueing and compute outlast the request timeout."""

    code = "compute_timeout"
    title = "Request timed out"


class BodyTimeout(ServiceError):
    """Raised when a client sends its body slower than the minimum rate."""

    code = "body_timeout"
    title = "Request body too slow"


class ModelUnavailable(ServiceError):
    """Raised when the requested model failed to load; the other models still serve."""

    code = "model_unavailable"
    title = "Model unavailable"


class DeliveryError(ServiceError):
    """Raised when the DICOM results of a received image cannot be sent to a destination."""

    code = "delivery_failed"
    title = "Results not delivered"


class ModelError(Exception):
    """Raised when a model folder cannot be loaded (bad model.toml, bad ONNX, ...)."""


class DicomServerError(Exception):
    """Raised when the DICOM C-STORE SCP cannot start (its packages missing, its port taken)."""


class TlsError(Exception):
    """Raised when the TLS settings' certificates or key cannot be loaded."""


class CompileError(ModelError):
    """Raised when the model compiler cannot build the explanation graphs."""
