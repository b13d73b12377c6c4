"""What a call to another deployment raises when the replica serving it is gone (killed, crashed,
being replaced) or none is free: the request may be retried, and is answered 503 with Retry-After."""

from __future__ import annotations

from ray import exceptions as ray_exceptions
from ray.serve import exceptions as serve_exceptions

REPLICA_FAILURES: tuple[type[BaseException], ...] = (
    ray_exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError
    serve_exceptions.BackPressureError,
    serve_exceptions.DeploymentUnavailableError,
    serve_exceptions.ReplicaUnavailableError,
)
RETRY_AFTER_S = 1
