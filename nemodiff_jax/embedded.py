"""The embedded default model: where it lies in the package, and the prompts the demo runs."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"

# The held-out Python of the embedded code model (docs/EMBEDDED_MODEL.md): functions of the standard-library
# modules that were kept out of its training corpus (scripts/code_corpus.py HELD_OUT), each cut after its
# docstring or first statement, as scripts/eval_code_model.py cuts them (tests/test_embedded_prompts.py
# checks that they are exactly its twelve). The demo (`make run`) completes the first four (the shortest); the GPU tests'
# bf16 comparisons and the server load generator use all twelve.
PROMPTS = [
    (
        'def rgb_to_yiq(r, g, b):\n'
        '    y = 0.30*r + 0.59*g + 0.11*b\n'
    ),
    (
        '    def __getitem__(self, i):\n'
        '        funcs = self._months[i]\n'
    ),
    (
        'def heappop(heap):\n'
        '    """Pop the smallest item off the heap, maintaining the heap invariant."""\n'
    ),
    (
        '    def __init__(self, node):\n'
        '        # The node this class is augmenting.\n'
        '        self.node = node\n'
    ),
    (
        '    def __init__(self, instream=None, infile=None, posix=False,\n'
        '                 punctuation_chars=False):\n'
        '        if isinstance(instream, str):\n'
        '            instream = StringIO(instream)\n'
    ),
    (
        'def __getattr__(name):\n'
        "    if name in ('January', 'February'):\n"
        '        warnings.warn(f"The \'{name}\' attribute is deprecated, use \'{name.upper()}\' instead",\n'
        '                      DeprecationWarning, stacklevel=2)\n'
        "        if name == 'January':\n"
        '            return 1\n'
        '        else:\n'
        '            return 2\n'
    ),
    (
        'def insort_right(a, x, lo=0, hi=None, *, key=None):\n'
        '    """Insert item x in list a, and keep it sorted assuming a is sorted.\n'
        '\n'
        '    If x is already in a, insert it to the right of the rightmost x.\n'
        '\n'
        '    Optional args lo (default 0) and hi (default len(a)) bound the\n'
        '    slice of a to be searched.\n'
        '\n'
        '    A custom key function can be supplied to customize the sort order.\n'
        '    """\n'
    ),
    (
        'def fnmatch(name, pat):\n'
        '    """Test whether FILENAME matches PATTERN.\n'
        '\n'
        '    Patterns are Unix shell style:\n'
        '\n'
        '    *       matches everything\n'
        '    ?       matches any single character\n'
        '    [seq]   matches any character in seq\n'
        '    [!seq]  matches any char not in seq\n'
        '\n'
        '    An initial period in FILENAME is not special.\n'
        '    Both FILENAME and PATTERN are first case-normalized\n'
        '    if the operating system requires it.\n'
        "    If you don't want this, use fnmatchcase(FILENAME, PATTERN).\n"
        '    """\n'
    ),
    (
        '@functools.lru_cache(maxsize = 1 << 14)\n'
        'def _hash_algorithm(numerator, denominator):\n'
        '\n'
        '    # To make sure that the hash of a Fraction agrees with the hash\n'
        '    # of a numerically equal integer, float or Decimal instance, we\n'
        '    # follow the rules for numeric hashes outlined in the\n'
        "    # documentation.  (See library docs, 'Built-in Types').\n"
        '\n'
        '    try:\n'
        '        dinv = pow(denominator, -1, _PyHASH_MODULUS)\n'
        '    except ValueError:\n'
        '        # ValueError means there is no modular inverse.\n'
        '        hash_ = _PyHASH_INF\n'
        '    else:\n'
        '        # The general algorithm now specifies that the absolute value of\n'
        '        # the hash is\n'
        '        #    (|N| * dinv) % P\n'
        "        # where N is self._numerator and P is _PyHASH_MODULUS.  That's\n"
        '        # optimized here in two ways:  first, for a non-negative int i,\n'
        "        # hash(i) == i % P, but the int hash implementation doesn't need\n"
        '        # to divide, and is faster than doing % P explicitly.  So we do\n'
        '        #    hash(|N| * dinv)\n'
        '        # instead.  Second, N is unbounded, so its product with dinv may\n'
        '        # be arbitrarily expensive to compute.  The final answer is the\n'
        '        # same if we use the bounded |N| % P instead, which can again\n'
        '        # be done with an int hash() call.  If 0 <= i < P, hash(i) == i,\n'
        '        # so this nested hash() call wastes a bit of time making a\n'
        '        # redundant copy when |N| < P, but can save an arbitrarily large\n'
        '        # amount of computation for large |N|.\n'
        '        hash_ = hash(hash(abs(numerator)) * dinv)\n'
    ),
    (
        'def glob(pathname, *, root_dir=None, dir_fd=None, recursive=False,\n'
        '        include_hidden=False):\n'
        '    """Return a list of paths matching a pathname pattern.\n'
        '\n'
        '    The pattern may contain simple shell-style wildcards a la\n'
        '    fnmatch. Unlike fnmatch, filenames starting with a\n'
        "    dot are special cases that are not matched by '*' and '?'\n"
        '    patterns by default.\n'
        '\n'
        "    If `include_hidden` is true, the patterns '*', '?', '**'  will match hidden\n"
        '    directories.\n'
        '\n'
        "    If `recursive` is true, the pattern '**' will match any files and\n"
        '    zero or more directories and subdirectories.\n'
        '    """\n'
    ),
    (
        '    def __init__(self,\n'
        '                 width=70,\n'
        '                 initial_indent="",\n'
        '                 subsequent_indent="",\n'
        '                 expand_tabs=True,\n'
        '                 replace_whitespace=True,\n'
        '                 fix_sentence_endings=False,\n'
        '                 break_long_words=True,\n'
        '                 drop_whitespace=True,\n'
        '                 break_on_hyphens=True,\n'
        '                 tabsize=8,\n'
        '                 *,\n'
        '                 max_lines=None,\n'
        "                 placeholder=' [...]'):\n"
        '        self.width = width\n'
    ),
    (
        'def bisect_right(a, x, lo=0, hi=None, *, key=None):\n'
        '    """Return the index where to insert item x in list a, assuming a is sorted.\n'
        '\n'
        '    The return value i is such that all e in a[:i] have e <= x, and all e in\n'
        '    a[i:] have e > x.  So if x already appears in the list, a.insert(i, x) will\n'
        '    insert just after the rightmost x already there.\n'
        '\n'
        '    Optional args lo (default 0) and hi (default len(a)) bound the\n'
        '    slice of a to be searched.\n'
        '\n'
        '    A custom key function can be supplied to customize the sort order.\n'
        '    """\n'
    ),
]
DEMO_PROMPTS = PROMPTS[:4]


def default_model() -> Path:
    """The embedded default model (trained here; see docs/EMBEDDED_MODEL.md)."""
    if not (ASSETS / "config.json").exists():
        raise SystemExit(f"no embedded model in {ASSETS}: pass --model PATH")
    return ASSETS
