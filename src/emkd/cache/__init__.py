"""The teacher's outputs computed once and stored on disk (``emkd cache-teacher``), and a teacher that reads them.

EM-KD, LLaVA-KD and the response-KD baselines read from the frozen teacher only its final hidden states and its LM
head, the same for a sample in every epoch. :func:`cache_teacher` runs the teacher once over a data set and stores
exactly these; training with ``teacher_cache: DIR`` then loads no teacher model, only :class:`CachedTeacher`.

* :mod:`emkd.cache.format`: what a cache directory holds, its versions, and :class:`CacheError`;
* :mod:`emkd.cache.fingerprint`: the digests a cache is checked against (files, token ids, teacher, data file);
* :mod:`emkd.cache.writer`: :func:`cache_teacher`, written into a staging folder and renamed into place;
* :mod:`emkd.cache.reader`: :class:`TeacherCache` and every check between its files and training;
* :mod:`emkd.cache.adapter`: :class:`CachedTeacher`, the teacher adapter training uses, and :func:`load_cached_teacher`;
* :mod:`emkd.cache.cli`: the ``emkd cache-teacher`` command (write, report sizes, ``--verify``).
"""

from emkd.cache.adapter import CachedTeacher, TeacherHead, load_cached_teacher, teacher_inputs
from emkd.cache.cli import add_cache_arguments, run_cache_teacher, run_verify, storage_summary
from emkd.cache.fingerprint import file_sha256, ids_digest, teacher_fingerprint
from emkd.cache.format import (
    CACHE_DTYPES,
    CACHE_FORMAT,
    CACHE_VERSION,
    HEAD_FILE,
    INDEX_FILE,
    READABLE_VERSIONS,
    CacheError,
    CacheExistsError,
    CacheMissingError,
)
from emkd.cache.reader import TeacherCache, check_index
from emkd.cache.writer import cache_teacher, clean_stale_staging

__all__ = [
    "CACHE_DTYPES",
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "HEAD_FILE",
    "INDEX_FILE",
    "READABLE_VERSIONS",
    "CacheError",
    "CacheExistsError",
    "CacheMissingError",
    "CachedTeacher",
    "TeacherCache",
    "TeacherHead",
    "add_cache_arguments",
    "cache_teacher",
    "check_index",
    "clean_stale_staging",
    "file_sha256",
    "ids_digest",
    "load_cached_teacher",
    "run_cache_teacher",
    "run_verify",
    "storage_summary",
    "teacher_fingerprint",
    "teacher_inputs",
]
