"""Decode slots: the rows of one program on the device, filled and freed one request at a time.

A `Pool` is `slots` rows of one program (mode, block size, policy, drafter) over one KV cache. Each row has
its own request settings (decoding.common.RowSettings: traced values, so a new temperature or threshold
never compiles), prompt length and progress. Admitting requests prefills only the new rows through the
model's attention path and scatters their K/V into the shared cache; the other rows are neither touched nor
copied. `run` advances the rows in one on-device while loop until a row finishes, all are done, or a step
budget runs out; `steps` is its Python-loop twin.

Prompts with images (a VLM: multimodal.Prompt) are admitted by a program of their own: the tower encodes the
admission's images one at a time (each its own patch-count bucket: patch_bucket), their features replace the
placeholder embeddings (vision.place_image_features) and the prefill runs from the embeddings. The text
admission, segment and step programs do not change: an image is prefix K/V like any other.

Everything that decodes runs on pools: `Generator.generate` / `stream` (one pool per call) and the serving
engine (engine.Engine: one pool per program, requests arriving and leaving), hence the batch job and the
server.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemodiff_jax import vision
from nemodiff_jax.cache import KVCache
from nemodiff_jax.config import Config
from nemodiff_jax.decoding import ar, diffusion, quadratic, speculative
from nemodiff_jax.decoding.common import Options, RowSettings, State, cond, initial_state, prefill
from nemodiff_jax.multimodal import Prompt, load_pixels

MODES = {"ar": ar, "diffusion": diffusion, "linear_spec": speculative, "quadratic_spec": quadratic}


def chunk_width(opts: Options) -> int:
    """The most cache slots one step writes past a row's length (quadratic_spec: its whole canvas)."""
    return quadratic.width(opts.block) if opts.mode == "quadratic_spec" else opts.block


def draft_width(opts: Options) -> int:
    """Drafts a row carries between steps (State.drafts): quadratic_spec's chain less its seed."""
    return opts.block - 1 if opts.mode == "quadratic_spec" else 0


ADMIT_MIN_WIDTH = 64  # admission prompt widths: powers of two from here (fewer shapes to compile)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def bucket(n: int, minimum: int = 16) -> int:
    """A power-of-two bucket of at least `minimum`, so a handful of shapes cover all sizes."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def buffer_sizes(longest: int, max_new: int, block: int) -> tuple[int, int]:
    """(KV capacity, output length) for prompts of up to `longest` tokens: the bucketed prompt, the new tokens
    and two blocks of slack (a block may run past the last kept token), rounded up; the output buffer takes
    one block of slack."""
    return round_up(bucket(longest, ADMIT_MIN_WIDTH) + max_new + 2 * block, 128), round_up(max_new + block, 64)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """A loaded model on its devices, as the compiled programs take it: the split module (graphdef, params),
    its config and dtype, the mesh (None: one device) and the matmul precision (float32 means float32:
    without "highest", GPUs run float32 matmuls at reduced precision)."""

    graphdef: object
    params: object
    config: Config
    dtype: object
    mesh: object = None

    @classmethod
    def of(cls, model, mesh=None) -> Runtime:
        graphdef, params = nnx.split(model)
        return cls(graphdef, params, model.config, model.dtype, mesh)

    @property
    def precision(self) -> str | None:
        return "highest" if self.dtype == jnp.float32 else None

    @property
    def data_rows(self) -> int:
        """Rows must come in multiples of this (the mesh's "data" axis)."""
        return 1 if self.mesh is None else self.mesh.shape["data"]

    def place_rows(self, *trees):
        """Shards per-row arrays (leading batch dim; pytrees of them too) over the mesh's "data" axis; a no-op
        without a mesh."""
        if self.mesh is None:
            return trees
        from nemodiff_jax.sharding import rows_sharding

        return tuple(jax.tree.map(lambda a: jax.device_put(a, rows_sharding(a.shape, self.mesh)), t) for t in trees)

    def cache_sharding(self, batch: int):
        from nemodiff_jax.sharding import cache_sharding

        return cache_sharding(self.config, batch, self.mesh)

    def prompt_rows(self, ids: Sequence[Sequence[int]], width: int, seeds: Sequence[int]):
        """Placed per-row inputs: prompts right-padded to [B, width], their lengths, PRNG keys from `seeds`."""
        prompt = np.zeros((len(ids), width), np.int32)
        for i, p in enumerate(ids):
            prompt[i, :len(p)] = p
        lens = np.array([len(p) for p in ids], np.int32)
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
        return self.place_rows(jnp.asarray(prompt), jnp.asarray(lens), keys)


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """One request's validated settings: the static options of its program and its per-row values."""

    opts: Options
    block: int
    max_new: int
    temperature: float
    top_k: int | None
    top_p: float | None
    stop_ids: tuple[int, ...]
    threshold: float
    steps: int
    think_budget: int = -1  # the most thinking tokens before </think> is forced (-1: none)
    think_end: int = -1  # the </think> id


def row_settings(plans: Sequence[RowPlan]) -> RowSettings:
    """The traced per-row settings of a batch of requests (one RowPlan per row)."""
    return RowSettings.make([p.max_new for p in plans], [p.temperature for p in plans], [p.top_k for p in plans],
                            [p.top_p for p in plans], [p.stop_ids for p in plans], [p.threshold for p in plans],
                            [p.steps for p in plans], [p.think_budget for p in plans], [p.think_end for p in plans])


def _ids(prompt) -> Sequence[int]:
    return prompt.ids if isinstance(prompt, Prompt) else prompt


def host_rows(st: State) -> State:
    """The per-row results on the host: the KV cache and the LoRA stay on the device (no GB-sized copy)."""
    return jax.device_get(dataclasses.replace(st, cache=None, lora=None))


def row_tokens(st: State, i: int) -> list[int]:
    """Row i's new tokens (host state): its budget, cut after the first stop token."""
    n = min(int(st.n_out[i]), int(st.rows.max_new[i]))
    toks = np.asarray(st.out[i, :n]).tolist()
    stops = set(np.asarray(st.rows.stop_ids[i]).tolist()) - {-1}
    for j, t in enumerate(toks):
        if t in stops:
            return toks[:j + 1]
    return toks


# ------------------------------------------------------------------ the compiled programs


# State's per-row parts
ROW_FIELDS = ("out", "n_out", "done", "seed", "keys", "rows", "passes", "rounds", "work", "drafts")


def _set_rows(old, new, idx):
    """old[idx] = new along the leading (row) axis, for arrays and PRNG keys."""
    if jnp.issubdtype(old.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_set_rows(jax.random.key_data(old), jax.random.key_data(new), idx))
    return old.at[idx].set(new)


def _admit(model, st: State, idx, prompt, lens, keys, rows: RowSettings, opts: Options, embeds=None) -> State:
    """Prefills only the new rows (idx [k], prompts [k, P]) through the model's attention path into a k-row
    cache of the prompt's width, then scatters their K/V (P slots per row) and per-row state into the shared
    state: the other rows' cache is not touched, nor copied. `embeds` [k, P, D]: the prompts' input
    embeddings (images spliced in), else the token lookup."""
    k, width = prompt.shape
    small = KVCache.init(model.config, k, round_up(width, 128), model.dtype)
    last, small = prefill(model, prompt, lens, small, opts, embeds)
    first = ar.first_token(last, small, keys, rows.sampling)
    new = initial_state(small, st.out.shape[1], keys, rows, st.lora, first,
                        0 if st.drafts is None else st.drafts.shape[1])
    slots = jnp.arange(width)[None, :]
    cache = dataclasses.replace(
        st.cache, lengths=st.cache.lengths.at[idx].set(lens),
        k=tuple(big.at[idx[:, None], slots].set(s[:, :width]) for big, s in zip(st.cache.k, small.k)),
        v=tuple(big.at[idx[:, None], slots].set(s[:, :width]) for big, s in zip(st.cache.v, small.v)))
    fields = {f: jax.tree.map(lambda a, b: _set_rows(a, b, idx), getattr(st, f), getattr(new, f)) for f in ROW_FIELDS}
    return dataclasses.replace(st, cache=cache, total_passes=st.total_passes + 1, **fields)


def _admit_images(model, st: State, idx, prompt, lens, keys, rows: RowSettings, features, index,
                  opts: Options) -> State:
    """_admit for rows with images: the image features [M, D] (the tower's, model.encode_images) take the
    placeholder rows that `index` [k, P] points from (-1: a text token), and the prefill runs from those
    embeddings. Only admissions of rows with images run this program; after it the rows decode as any other."""
    embeds = vision.place_image_features(model.embed(prompt), features, index)
    return _admit(model, st, idx, prompt, lens, keys, rows, opts, embeds)


def _segment(model, step_fn, opts: Options, st: State, max_steps, until_all) -> State:
    """Steps until all rows are done, or (unless `until_all`) a row that was running finishes, or `max_steps`
    steps ran. Both limits are traced: one program for every use."""
    done0 = st.done

    def keep_going(c):
        s, i = c
        return ~jnp.all(s.done) & (until_all | ~jnp.any(s.done & ~done0)) & (i < max_steps)

    st, _ = jax.lax.while_loop(keep_going, lambda c: (step_fn(model, c[0], opts), c[1] + 1), (st, jnp.int32(0)))
    return st


@dataclasses.dataclass(frozen=True)
class Programs:
    """One program's compiled entry points (admit, segment, step), closed over the module's graphdef, the
    mode's step and the static options: a call passes arrays only, so dispatch hashes no module structure
    (an 8B graphdef costs about a millisecond per hash, and a segment boundary is paid every few steps)."""

    admit: object
    segment: object
    step: object
    admit_images: object  # the admission of rows with images (compiled only when such a row comes)

    def compiled(self) -> int:
        """Compiled variants so far (shapes), for tests that count compiles."""
        return sum(f._cache_size() for f in (self.admit, self.segment, self.step, self.admit_images))


_PROGRAMS: dict[tuple, Programs] = {}  # (graphdef, step_fn, opts) -> its programs
_ENCODERS: dict[object, object] = {}  # graphdef -> its jitted encode_images


def programs(graphdef, step_fn, opts: Options) -> Programs:
    """The compiled entry points of one (module, mode step, options), built once."""
    key = (graphdef, step_fn, opts)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _build_programs(graphdef, step_fn, opts)
    return _PROGRAMS[key]


def _build_programs(graphdef, step_fn, opts: Options) -> Programs:
    def admit(params, st, idx, prompt, lens, keys, rows):
        return _admit(nnx.merge(graphdef, params), st, idx, prompt, lens, keys, rows, opts)

    def segment(params, st, max_steps, until_all):
        return _segment(nnx.merge(graphdef, params), step_fn, opts, st, max_steps, until_all)

    def step(params, st):
        return step_fn(nnx.merge(graphdef, params), st, opts)

    def admit_images(params, st, idx, prompt, lens, keys, rows, features, index):
        return _admit_images(nnx.merge(graphdef, params), st, idx, prompt, lens, keys, rows, features, index, opts)

    return Programs(admit=jax.jit(admit, donate_argnums=(1,)), segment=jax.jit(segment, donate_argnums=(1,)),
                    step=jax.jit(step, donate_argnums=(1,)), admit_images=jax.jit(admit_images, donate_argnums=(1,)))


def encoder(graphdef):
    """The jitted image encoder of one module: ImagePatches -> features float32 [M, D] (model.encode_images);
    one compile per patch-count bucket (patch_bucket)."""
    if graphdef not in _ENCODERS:
        _ENCODERS[graphdef] = jax.jit(lambda params, patches: nnx.merge(graphdef, params).encode_images(patches))
    return _ENCODERS[graphdef]


def patch_bucket(n: int, minimum: int = 64) -> int:
    """A bucket of at least n patches with a quarter-octave step (64, 80, 96, 112, 128, 160, ...): few shapes
    to compile, at most 25% padding (the tower's attention grows with the square of it)."""
    n = max(n, minimum)
    step = 1 << max(0, (n - 1).bit_length() - 3)
    return round_up(n, step)


def encode_images(rt: Runtime, prompts: Sequence[Prompt]) -> tuple[jax.Array, list[int]]:
    """The tower's features float32 [M, D] of every image of `prompts`, in order, and where each prompt's
    features start. Each image is encoded by itself (one jitted encode per image, its patch count bucketed:
    patch_bucket): attention stays within an image anyway, and encoding several together would still compute
    every image's queries against every image's keys (8 images: 8x the attention work). M is the total
    bucketed the same way (zero rows after the real ones), so the admission programs see a few shapes."""
    vcfg = rt.config.vision
    if vcfg is None:
        raise ValueError("image prompts need a VLM checkpoint (this one has no vision tower)")
    encode = encoder(rt.graphdef)
    features, offsets, start = [], [], 0
    for p in prompts:
        offsets.append(start)
        for image in p.images:
            image = load_pixels(image)
            n = image.num_image_tokens
            patches = vision.patchify([image.pixel_values], vcfg, pad_to=patch_bucket(n * vcfg.spatial_merge_size ** 2))
            features.append(encode(rt.params, patches)[:n])
            start += n
    r = vcfg.spatial_merge_size ** 2
    padding = patch_bucket(start * r) // r - start
    features.append(jnp.zeros((padding, features[0].shape[1]), features[0].dtype))
    return jnp.concatenate(features), offsets


def feature_index(prompts: Sequence[Prompt], starts: Sequence[int], width: int, image_token_id: int) -> np.ndarray:
    """int32 [len(prompts), width]: the feature (from encode_images) each position of a prompt right-padded to
    `width` takes, -1 for a text token: prompt i's k-th placeholder takes feature starts[i] + k."""
    index = np.full((len(prompts), width), -1, np.int32)
    for r, (p, start) in enumerate(zip(prompts, starts)):
        where = np.flatnonzero(np.asarray(p.ids) == image_token_id)
        if len(where) != p.num_image_tokens:
            raise ValueError(f"the prompt has {len(where)} image placeholders for {p.num_image_tokens} image "
                             "features")
        index[r, where] = start + np.arange(len(where), dtype=np.int32)
    return index


def clear_programs() -> None:
    """Forgets every built program, so that their compiled executables can be freed (with jax.clear_caches()).

    Each program keeps its compiled variants alive, and on the CPU each executable holds its JIT code in
    memory mappings of its own: a process that builds programs for many models (the test suite: ~5k mappings
    per test module) reaches the kernel's vm.max_map_count (65530), after which XLA's allocations fail inside
    compiles (seen as segfaults and aborts in libgcc's unwinder). A server of one model builds a bounded set."""
    _PROGRAMS.clear()
    _ENCODERS.clear()


def compiled_programs() -> int:
    """Compiled admit/segment/step/image-encoder variants over every program built so far (tests count
    compiles)."""
    return (sum(p.compiled() for p in list(_PROGRAMS.values()))
            + sum(f._cache_size() for f in list(_ENCODERS.values())))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 9))
def _empty_state(cfg, dtype, n: int, capacity: int, out_len: int, cache_sharding, keys, rows: RowSettings,
                 lora, drafts: int) -> State:
    """`n` done rows over a zeroed cache: no forward runs until the first admission."""
    cache = KVCache.init(cfg, n, capacity, dtype, sharding=cache_sharding)
    st = initial_state(cache, out_len, keys, rows, lora, jnp.zeros((n,), jnp.int32), drafts)
    return dataclasses.replace(st, done=jnp.ones((n,), bool))


@jax.jit
def _stop_rows(st: State, stop) -> State:
    return dataclasses.replace(st, done=st.done | stop)


class Pool:
    """`slots` decode rows of one program (mode, block, policy, drafter): rows of different requests run in
    one on-device loop, each with its own RowSettings, prompt length and progress. A finished or cancelled
    row's slot takes the next request by a prefill of the new rows alone."""

    def __init__(self, runtime: Runtime, opts: Options, lora, slots: int, capacity: int, out_len: int):
        if slots % runtime.data_rows:
            raise ValueError(f"{slots} slots must divide over the mesh's {runtime.data_rows} data rows")
        self.rt, self.opts, self.lora, self.n = runtime, opts, lora, slots
        self.capacity, self.out_len = capacity, out_len
        self.programs = programs(runtime.graphdef, MODES[opts.mode].step, opts)
        self.st: State | None = None
        self.owner: list[object | None] = [None] * slots  # whatever the caller keeps per slot
        self.started = [0.0] * slots

    def free(self) -> list[int]:
        return [i for i, o in enumerate(self.owner) if o is None]

    def busy(self) -> bool:
        return any(o is not None for o in self.owner)

    def admission_shapes(self, max_prompt: int) -> list[tuple[int, int]]:
        """Every (rows, width) an admission of prompts up to `max_prompt` tokens compiles (a warm-up list)."""
        counts = sorted({self._count(k) for k in range(1, self.n + 1)})
        widths = sorted({bucket(w, ADMIT_MIN_WIDTH) for w in range(1, max_prompt + 1)})
        return [(c, w) for c in counts for w in widths]

    def _count(self, k: int) -> int:
        return min(round_up(bucket(k, 1), self.rt.data_rows), self.n)

    def _initial(self) -> State:
        """An all-done state of `slots` rows, so every admission is a row refill."""
        rt, n = self.rt, self.n
        keys = jax.vmap(jax.random.key)(jnp.zeros((n,), jnp.uint32))
        rows = RowSettings.make([1] * n, [0.0] * n, [None] * n, [None] * n, [()] * n, [0.0] * n,
                                [self.opts.block] * n)
        keys, rows = rt.place_rows(keys, rows)
        return _empty_state(rt.config, rt.dtype, n, self.capacity, self.out_len, rt.cache_sharding(n), keys, rows,
                            self.lora, draft_width(self.opts))

    def admit(self, items: dict[int, tuple[object, Sequence[int] | Prompt, int, RowPlan]]) -> None:
        """items: slot -> (owner, prompt, seed, plan); a prompt is token ids, or a multimodal.Prompt (ids and
        images). The prompts are prefilled together, padded to a power-of-two count and width (a handful of
        shapes: admission_shapes). Prompts with images are prefilled by a program of their own
        (Programs.admit_images) after the tower has encoded their images; text rows never run it."""
        if not items:
            return
        if self.st is None:
            self.st = self._initial()
        now = time.perf_counter()
        for i in items:
            self.owner[i], self.started[i] = items[i][0], now
        with_images = {i: it for i, it in items.items() if getattr(it[1], "images", ())}
        text = {i: it for i, it in items.items() if i not in with_images}
        for group in (text, with_images):
            if group:
                self._prefill(group, images=group is with_images)

    def _prefill(self, items: dict, images: bool) -> None:
        rt = self.rt
        slots = sorted(items)
        pad = slots + [slots[0]] * (self._count(len(slots)) - len(slots))  # repeats rewrite one row, same values
        ids = [_ids(items[i][1]) for i in pad]
        width = bucket(max(map(len, ids)), ADMIT_MIN_WIDTH)
        prompt, lens, keys = rt.prompt_rows(ids, width, [items[i][2] for i in pad])
        rows = row_settings([items[i][3] for i in pad])
        idx = np.asarray(pad, np.int32)
        with jax.default_matmul_precision(rt.precision):
            if not images:
                self.st = self.programs.admit(rt.params, self.st, idx, prompt, lens, keys, rows)
                return
            features, index = self._image_features([items[i][1] for i in slots], slots, pad, width)
            (index,) = rt.place_rows(jnp.asarray(index))
            self.st = self.programs.admit_images(rt.params, self.st, idx, prompt, lens, keys, rows, features, index)

    def _image_features(self, prompts: list, slots: list[int], pad: list[int], width: int):
        """The features of every image of `prompts` (one per slot, in `slots` order: encode_images) and each
        padded row's index [len(pad), width] into them (feature_index)."""
        features, offsets = encode_images(self.rt, prompts)
        by_slot = {slot: (p, start) for slot, p, start in zip(slots, prompts, offsets)}
        rows = [by_slot[slot] for slot in pad]
        return features, feature_index([p for p, _ in rows], [start for _, start in rows], width,
                                       self.rt.config.vision.image_token_id)

    def advance(self, max_steps: int = 1 << 30, until_all: bool = False) -> None:
        """Runs one on-device loop: until a row finishes (or, with `until_all`, all are done) or max_steps."""
        rt = self.rt
        with jax.default_matmul_precision(rt.precision):
            self.st = self.programs.segment(rt.params, self.st, np.int32(max_steps), np.bool_(until_all))

    def run(self, max_steps: int = 1 << 30, until_all: bool = False) -> State:
        """advance(), then the rows' state on the host."""
        self.advance(max_steps, until_all)
        return host_rows(self.st)

    def steps(self) -> Iterator[State]:
        """The Python-loop twin of advance(until_all=True): one jitted step per iteration, yielding the
        device state after each."""
        rt = self.rt
        while bool(cond(self.st)):
            with jax.default_matmul_precision(rt.precision):
                self.st = self.programs.step(rt.params, self.st)
            yield self.st

    def release(self, slots: Sequence[int]) -> None:
        """Frees slots now (a cancelled or finished request): their rows stop at once."""
        if not slots:
            return
        stop = np.zeros(self.n, bool)
        stop[list(slots)] = True
        for i in slots:
            self.owner[i] = None
        self.st = _stop_rows(self.st, self.rt.place_rows(jnp.asarray(stop))[0])
