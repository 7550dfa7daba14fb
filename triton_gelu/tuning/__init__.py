"""Autotuning: config spaces per architecture, problem keys, pruning, the choice of a kernel's
config (``Tuner``) and of an op's path (``Paths``), and where those choices are remembered.

A ``Tuner`` wraps one ``@triton.jit`` kernel and picks its launch config per problem key; a
``Paths`` picks, per problem key, between the named ways of computing one op (the fused Triton
kernel, cuBLAS plus an elementwise kernel, PyTorch's own op). Both answer a launch with one dict
lookup when warm. On a miss they decide, in this order:

1. a forced path (``Paths`` only: ``TRITON_GELU_PATH`` / ``force_path``, ``.._settings``);
2. the on-disk cache of this device, Triton version and kernel source (JSON in
   ``cache.cache_dir()``; under the ``full`` policy only entries that were tuned under ``full``);
3. no timing while a CUDA stream captures a graph or under the ``off`` policy: the cache entry,
   else the shipped table's (``table.py``), else the default (a Tuner: the cost model's best
   config, ``model.py``; a Paths: its ``untuned`` path), with one warning per problem under
   capture;
4. otherwise timing, holding the cache file's inter-process lock (``cache.locked``) and
   re-reading the file first, so that of many processes tuning the same key only the first
   times it: ``full`` times every config of the pruned space and every path; ``fast`` (the
   default) the table's config (or, without one, the table's nearest problem's) and the cost
   model's best two others (one for a memory-bound kernel: ``tuner.MODEL_TOP``), and only the
   paths the model does not show losing (``model.paths_worth_timing``).
   Each candidate is timed with ``triton.testing.do_bench`` (median), a path after one warm-up
   call (which also lets the Tuners inside it tune); the fastest is written to the cache with
   every candidate's time.

The cache is one JSON file per (kernel or op, device name, Triton version, hash of the source of
the kernel and of every ``@triton.jit`` helper it calls), so editing a kernel or its math retunes
and nothing else does; a path file also names the torch version (cuBLAS comes with it). It lives
in ``$TRITON_GELU_CACHE_DIR``, else ``$XDG_CACHE_HOME/triton_gelu``, else
``~/.cache/triton_gelu``; delete the directory (or run ``python -m triton_gelu.autotune
--clear``) to forget every tuning. Files are written atomically; an unreadable file, and an entry
that is no longer in its pruned config space, are ignored.

Before any of this the config space is pruned twice: by shape and the shared-memory estimate
(``spaces.py``), then by the compile facts of the architecture (``facts.py``: a config that does
not compile, cannot fit, or spills inside its main loop is never compiled at run time).

Under the Triton interpreter nothing is timed (the interpreter cannot benchmark) and nothing is
read or written: a kernel runs with the single small config of the interpreter's space and an op
with its ``default`` path. A timing function can be injected (``Tuner(..., bench=fake)``,
``Paths(..., bench=fake)``) so the whole logic, caching and locking included, runs on the CPU.

Key conventions: elementwise kernels key on ``(bucket(numel), dtype, ...)``, matmul kernels on
``(bucket(M), N, K, dtype, ...)``. Config spaces are ``configs(arch)`` and prune functions
``prune(configs, key, arch)``, where ``arch`` is ``"sm90"``, ``"sm80"``, ``"sm86"``, ``"sm89"``,
``"default"`` (any other GPU) or ``None`` (the interpreter).

Modules, one job each: ``spaces`` (config spaces, the shared-memory model, pruning), ``facts``
(compile facts per architecture, and the pruning they drive), ``compiled`` (making them:
``triton.compile`` for a GPU that need not be here), ``model`` (the cost model), ``keys``
(devices, source hashes, key texts), ``chooser`` (what a Tuner and a Paths share: memory, disk,
table, policy, capture, lock), ``tuner`` (``Tuner``), ``paths`` (``Paths``), ``cache`` and
``table`` (the files; they need no Triton). Importing this package imports none of them.
"""
