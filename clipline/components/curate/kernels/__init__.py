"""The compiled (numba) loops of the curate stage.

Each loop here is the fast form of a public operation of ``curate.dedup`` or ``curate.language``,
whose docstring states the contract and beside which the plain reference implementation lives;
the tests compare the two. Nothing outside those two modules calls a kernel.

- :mod:`.dedup`: the keep-first visit over dense group ids, the hash-set "value repeats" pass,
  the first-position map of 64-bit values and the byte comparison of strings with their group's
  first;
- :mod:`.language`: langid's naive-Bayes model stepped over the UTF-8 bytes of an Arrow string
  array, in float64 (class and probability) and as the float32 "confidently another language"
  verdict.

numba is a dependency. Every kernel is compiled with ``cache=True``: the first process on a machine
compiles it (seconds) and writes the machine code beside this package (``__pycache__``, or numba's
user cache when that is read-only); later processes load it on the first call, which is why the
stage calls ``warm_up`` of both modules before it starts timing its steps.
"""
