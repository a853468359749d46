"""dreamsight: the typed Python client of the self-hosted multimodal AI platform.

>>> from dreamsight import Client
>>> client = Client()  # $DREAMSIGHT_HOST and $DREAMSIGHT_API_KEY
>>> reply = client.chat("llava-demo", [{"role": "user", "content": "What is this?",
...                                      "images": ["photo.jpg"]}])
>>> print(reply.text)

The generated contract lives in one module per proto package:
``dreamsight.vision.v1``, ``dreamsight.diffusion.v1``, ``dreamsight.gateway.v1``
and ``dreamsight.common.v1`` (``*_pb2`` messages, ``*_pb2_grpc`` stubs).
"""

from dreamsight._client import (
    AsyncClient,
    AsyncTrainingJobHandle,
    Client,
    RetryPolicy,
    Timeouts,
    TrainingJobHandle,
)
from dreamsight._errors import (
    AuthenticationError,
    Cancelled,
    DeadlineExceeded,
    DreamsightError,
    FailedPrecondition,
    InternalError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    QuotaViolation,
    RateLimited,
    Unavailable,
    Unimplemented,
)
from dreamsight._types import (
    ApiKey,
    ChatChunk,
    ChatResponse,
    CreatedKey,
    GeneratedImage,
    GenerateProgress,
    GenerateResult,
    JobEvent,
    Message,
    MessageDict,
    Model,
    Options,
    Tool,
    ToolCall,
    ToolChoice,
    TrainingJob,
    Usage,
    UsageWindow,
)

__version__ = "0.1.0"

__all__ = [
    "ApiKey",
    "AsyncClient",
    "AsyncTrainingJobHandle",
    "AuthenticationError",
    "Cancelled",
    "ChatChunk",
    "ChatResponse",
    "Client",
    "CreatedKey",
    "DeadlineExceeded",
    "DreamsightError",
    "FailedPrecondition",
    "GenerateProgress",
    "GenerateResult",
    "GeneratedImage",
    "InternalError",
    "InvalidRequest",
    "JobEvent",
    "Message",
    "MessageDict",
    "Model",
    "NotFound",
    "Options",
    "PermissionDenied",
    "QuotaViolation",
    "RateLimited",
    "RetryPolicy",
    "Timeouts",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "TrainingJob",
    "TrainingJobHandle",
    "Unavailable",
    "Unimplemented",
    "Usage",
    "UsageWindow",
]
