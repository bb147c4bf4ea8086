"""Error classes of the Hub layer: each message says what to do next.

Messages never contain the token: :func:`mergekit_mllm.hub.push.redact` is
applied to anything that comes back from the network before it is raised.
"""


class PushError(Exception):
    """A push cannot start or did not finish; the local output is untouched."""


class OutputFolderError(PushError):
    """The merge output folder is missing or is not a model folder."""


class ResultsError(PushError):
    """An eval_suite results file is unreadable or belongs to another model."""


class MissingTokenError(PushError):
    """No Hugging Face token in the environment or the huggingface_hub login."""


class RepoExistsError(PushError):
    """The target repository exists and ``--exist-ok``/``exist_ok`` was not given."""


class UploadError(PushError):
    """The Hub refused the upload or stayed unreachable after retries."""


class HubSectionError(PushError, ValueError):
    """The recipe's ``hub:`` section is invalid (raised before any merge work)."""
