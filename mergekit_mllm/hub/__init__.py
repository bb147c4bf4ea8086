"""Publish a merged model to the Hugging Face Hub with an evaluation card.

``mergekit-mllm push OUT --repo OWNER/NAME`` (:mod:`.cli`) and the automatic
push after ``mergekit-yaml`` when a recipe has a ``hub:`` section
(:mod:`.auto`) share one pipeline:

1. :mod:`.output`  reads the merge output folder (never writes to it);
2. :mod:`.results` reads eval_suite results and matches them to the merged
   model, its base and its experts;
3. :mod:`.card`    builds the model card with ``ModelCardData``/``EvalResult``;
4. :mod:`.push`    plans the commit (files, sizes, card, plot) offline and
   uploads it with ``HfApi.create_repo``/``create_branch``/``create_commit``.

Importing this package is cheap; heavy imports happen inside the functions.
"""

from mergekit_mllm.hub.errors import (
    HubSectionError,
    MissingTokenError,
    OutputFolderError,
    PushError,
    RepoExistsError,
    ResultsError,
    UploadError,
)

__all__ = [
    "PushError",
    "HubSectionError",
    "MissingTokenError",
    "OutputFolderError",
    "RepoExistsError",
    "ResultsError",
    "UploadError",
]
