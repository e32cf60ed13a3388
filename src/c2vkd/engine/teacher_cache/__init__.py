"""Precomputed teacher outputs: ``c2vkd cache-teacher`` writes them, ``teacher.cache`` reads them.

The frozen teacher's outputs are a pure function of its weights and of its input view. With an
augmentation pool (``data.augment_pool = K >= 1``, see ``data/sampler.py``) the student only ever sees N*K
views, each named by ``(index, sample_seed)``, so the teacher can be run once per view ahead of training and
its outputs read back instead of recomputed every epoch. ``K = 1`` is the "no random augmentation" case.

What is exact and what is approximated
--------------------------------------
* The views are exact: the cache is keyed by the same ``(index, sample_seed)`` the training sampler yields,
  and the dataset applies all augmentation from the seed, so the cached view *is* the training view.
* Feature taps (the ones the configured losses read) are stored at full tap resolution in the storage dtype
  (float16 by default: relative error ~ 2^-11; float32 is exact).
* Logits are stored compactly, per pixel, after an optional bilinear downsampling by ``downsample``
  (``align_corners=False``; 4 matches the stride-4 decoder of DeepLabV3+ teachers):
    - ``top_idx``: the ``k`` classes with the largest logits (uint8, int16 beyond 256 classes),
    - ``top_val``: their logits minus the pixel's maximum (``top_val[0] == 0``; storage dtype),
    - ``max``: the pixel's maximum logit (float32),
    - ``rest_lse``: log-sum-exp of the other ``K - k`` logits minus the maximum (absent when ``k == K``).
  Reconstruction puts the ``k`` stored logits back and gives each of the other ``K - k`` classes
  ``max + rest_lse - log(K - k)``. At temperature 1 this preserves softmax exactly where it matters: the
  probabilities of the top-k classes and the total probability ``R`` of the rest are those of the full
  logits (up to the storage dtype); only how ``R`` is split among the non-top-k classes is lost (uniform),
  so ``|p - p_hat| <= R`` per class and ``KL(p || p_hat) <= R * log(K - k)`` per pixel. The fill never
  exceeds the smallest stored logit, so the argmax and the top-k order are kept. At another temperature
  the top-k ratios are exact but the rest's mass is approximate; losses normalising over space rather than
  classes (CWD on logits) see the uniform fill directly - use ``--topk 0`` (all classes) for those.
  Finally the logits are upsampled back to the crop bilinearly (exact only with ``downsample = 1``).
  With ``--topk 0 --downsample 1 --dtype float32`` the cache reproduces the live teacher up to float32
  rounding (tested: same loss trajectory as the live teacher).

Folder layout
-------------
``shard_00000.safetensors``, ... (views ``v = index * K + j`` in order, ``shard_size`` per file), each with
``index`` / ``seed`` (int64 [m]: the view's key), ``top_idx`` / ``top_val`` [m, k, h, w], ``max`` /
``rest_lse`` [m, h, w] and ``tap.<name>`` [m, ...]; written atomically (temporary file + rename), each with
the cache's settings hash in its metadata, so an interrupted ``cache-teacher`` resumes where it stopped.
``index.json`` is written last: the cache is complete iff it exists. It holds the *fingerprint* of
everything the teacher's outputs depend on (teacher name, kwargs, checkpoint file sha256 and the sha256 of
the built teacher's weights; dataset format, split, sample list; mean/std, train transform, pool size and
pool seed); training recomputes the fingerprint and refuses a cache whose fingerprint differs, naming each
difference. Not covered: editing image files in place without changing their size, or changing c2vkd's
transform code - rebuild the cache after either.

Modules
-------
``codec`` (compact logits: :func:`encode_logits` / :func:`decode_logits`), ``fingerprint`` (what the cached
outputs depend on) and ``store`` (reading a complete cache: :class:`TeacherCache`, :class:`CachedTeacherDataset`,
:func:`open_for_config`). The writer, :func:`c2vkd.runners.cache_teacher.build_teacher_cache` (what
``c2vkd cache-teacher`` runs), builds and runs the teacher, so it sits with the other runners.
"""
from c2vkd.engine.teacher_cache.codec import DTYPES, TeacherCacheError, decode_logits, encode_logits, stored_hw
from c2vkd.engine.teacher_cache.fingerprint import (fingerprint_diff, pool_seed_of, samples_sha256,
                                                    state_dict_sha256, teacher_fingerprint)
from c2vkd.engine.teacher_cache.store import FORMAT, INDEX_FILE, CachedTeacherDataset, TeacherCache, open_for_config

__all__ = ["DTYPES", "FORMAT", "INDEX_FILE", "CachedTeacherDataset", "TeacherCache", "TeacherCacheError",
           "decode_logits", "encode_logits", "fingerprint_diff", "open_for_config",
           "pool_seed_of", "samples_sha256", "state_dict_sha256", "stored_hw", "teacher_fingerprint"]
