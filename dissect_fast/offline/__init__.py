"""Offline subset selection from reference-model embeddings: random, clipscore, clipcov.

``embeddings_io``: the embeddings directory (writer used by ``dissect-fast embed``, reader);
``proxy``: zero-shot classes, k-means, splitting of huge classes; ``clipcov``: the objective
and its greedy maximisation; ``subset``: ``select_subset`` and ``dissect-fast select-subset``.
"""

from dissect_fast.offline.clipcov import ClipCovConfig, ClipCovResult, clipcov_reference, clipcov_select
from dissect_fast.offline.embeddings_io import Embeddings, EmbeddingsError, EmbeddingWriter, load_embeddings
from dissect_fast.offline.subset import SubsetResult, budget_for, main_select_subset, select_subset

__all__ = [
    "ClipCovConfig",
    "ClipCovResult",
    "EmbeddingWriter",
    "Embeddings",
    "EmbeddingsError",
    "SubsetResult",
    "budget_for",
    "clipcov_reference",
    "clipcov_select",
    "load_embeddings",
    "main_select_subset",
    "select_subset",
]
