"""TF-IDF retrieval in numpy: which earlier exchanges of a dialogue share the most rare words with
a query (the RAG baseline's memory, eval/baselines.py)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

# Function words that would otherwise dominate TF-IDF over a handful of chat messages, where
# even smoothed IDF barely down-weights them.
STOPWORDS: frozenset[str] = frozenset(
    """a an and are as at be but by can do for from had has have how i i'm if in is it it's just
    me my of on or so that the their them they this to was we were what when where which who will
    with would you your""".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def word_tokens(text: str) -> list[str]:
    """Lowercased word tokens (letters/digits, an optional 's-like suffix), stopwords removed."""
    return [token for token in _WORD.findall(text.lower()) if token not in STOPWORDS]


def tfidf_vectors(documents: Sequence[str], query: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """L2-normalised TF-IDF rows for the documents and the query, plus the vocabulary.

    The vocabulary and IDF come from the documents only: tf = raw count, idf(t) =
    ln((1 + N) / (1 + df(t))) + 1 (smoothed, so a term in every document still counts a little).
    Query words outside the vocabulary carry no weight. All-zero rows stay zero.
    """
    tokenized = [word_tokens(document) for document in documents]
    vocabulary = sorted({token for tokens in tokenized for token in tokens})
    column = {token: j for j, token in enumerate(vocabulary)}
    counts = np.zeros((len(documents), len(vocabulary)))
    for i, tokens in enumerate(tokenized):
        for token, count in Counter(tokens).items():
            counts[i, column[token]] = count
    query_counts = np.zeros(len(vocabulary))
    for token, count in Counter(word_tokens(query)).items():
        if token in column:
            query_counts[column[token]] = count
    document_frequency = (counts > 0).sum(axis=0)
    idf = np.log((1.0 + len(documents)) / (1.0 + document_frequency)) + 1.0
    return _l2_normalise(counts * idf), _l2_normalise(query_counts * idf), vocabulary


def _l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def cosine_scores(documents: Sequence[str], query: str) -> np.ndarray:
    """TF-IDF cosine similarity of the query to each document (0 when nothing is shared)."""
    if not documents:
        return np.zeros(0)
    document_vectors, query_vector, _ = tfidf_vectors(documents, query)
    return document_vectors @ query_vector


def top_k_indices(scores: np.ndarray, k: int) -> list[int]:
    """Up to k indices with positive score, best first; ties go to the earlier index.

    Zero-score documents share no word with the query, so they are not "relevant context".
    """
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order[:k] if scores[i] > 0]
