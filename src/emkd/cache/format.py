"""What a teacher cache directory holds, its versions, and the errors of a cache that cannot be used.

A cache directory::

    index.json                          written last; a directory without it is not a cache
    head.safetensors                    "weight" [V, D] (and "bias" [V]) in the dtype the teacher ran in
    cache-00000-of-000NN.safetensors    per sample i: "s{i}.hidden" [n_i, D] (cache dtype), "s{i}.vision" [n_i] bool
    ...

``n_i`` is the number of real tokens of sample ``i`` (its ``attention_mask`` sum), ``i`` its
:class:`~emkd.data.PairDataset` index; a shard holds consecutive samples up to about ``shard_bytes``.
``s{i}.hidden`` are the teacher's final hidden states at those positions (vision tokens, text tokens and response
positions), ``s{i}.vision`` which of them are vision tokens.

``index.json`` records the teacher (directory, fingerprint of its config and weights, dtype), the data and how they
were rendered (file identity, images folder, template, ``max_length``, ``on_bad_sample``, ``allow_outside_images``),
the cache dtype, ``hidden_size``, ``vocab_size``, ``head_bias``, the shards with their sizes and SHA-256, the LM
head's size and SHA-256, and per sample its shard, number of real tokens, number of vision tokens, token-id digest
and record place (``samples.source``, ``"line:index"``).

Versions (:data:`CACHE_VERSION` is written, :data:`READABLE_VERSIONS` are read):

* 1: no checksums; loads with a warning.
* 2: ``shard_sha256`` and ``head_sha256``.
* 3: no ``attention_layer`` in the index and no ``s{i}.iva`` tensors (Align-TI's IVA weights, which no training
  path read). In caches of versions 1 and 2 both are ignored.

Every error a user can cause (a damaged or foreign cache, data or teacher that do not match it) is a
:class:`CacheError`, a :class:`~emkd.errors.UserError`: ``emkd`` prints it as one line and exits with status 2.
"""

from __future__ import annotations

from emkd.errors import UserError
from emkd.models.compose import DTYPES

CACHE_FORMAT = "emkd-teacher-cache"
CACHE_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
INDEX_FILE = "index.json"
HEAD_FILE = "head.safetensors"
CACHE_DTYPES = tuple(DTYPES)  # ("float32", "bfloat16", "float16")
DEFAULT_SHARD_BYTES = 1 << 30
#: the end of every error that only rebuilding the cache fixes
REBUILD = "rebuild it with `emkd cache-teacher TEACHER DATA --out DIR --overwrite`"


class CacheError(UserError):
    """A teacher cache that cannot be used: damaged, incomplete, or built from another teacher or other data."""


class CacheMissingError(CacheError, FileNotFoundError):
    """A cache directory without ``index.json``, or a file its index lists that is not there."""


class CacheExistsError(CacheError, FileExistsError):
    """``cache_teacher`` would write into a non-empty directory without ``overwrite``."""
