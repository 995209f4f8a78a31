"""Credentials stay out of Ray runtime envs.

In: the ``env_vars`` of a runtime env the project is about to hand to Ray (a submitted job's,
Ray Train workers'). Out: nothing, or :class:`retriever.errors.InputError` naming the variable.
A runtime env is shown by the Ray dashboard and written to Ray's logs, so secrets never go
there: nodes use what they already have -- an instance role or IRSA, a Kubernetes Secret in
the pod's environment, or, for a Ray on this machine, the environment of the process that
started it.
"""

from __future__ import annotations

import re
from typing import Mapping

from retriever.errors import InputError

# Names (case-insensitive) of the variables that hold secrets: cloud keys and tokens.
CREDENTIAL_NAMES = re.compile(
    r"^(AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|AWS_SECURITY_TOKEN"
    r"|GOOGLE_APPLICATION_CREDENTIALS|AZURE_STORAGE_KEY|AZURE_CLIENT_SECRET"
    r"|.*_(TOKEN|SECRET|PASSWORD|API_KEY))$", re.IGNORECASE)


def is_credential(name: str) -> bool:
    return bool(CREDENTIAL_NAMES.match(name))


def refuse_credentials(env_vars: Mapping[str, str], where: str) -> None:
    """Raise InputError if ``env_vars`` (bound for ``where``) holds a credential."""
    found = sorted(name for name in env_vars if is_credential(name))
    if found:
        raise InputError(
            f"{where}: {', '.join(found)} would be put into a Ray runtime_env, which the "
            "dashboard shows; give the nodes their credentials instead (instance role, "
            "Kubernetes Secret, or the environment the cluster was started with)")
