"""The runnable model: split NNX state plus jitted pure prefill/decode functions over (params, cache).

``nnx.split`` happens once, when the ``Model`` is built. ``forward`` below is a pure function of
(graphdef, params, tokens, cache, valid); it is jitted with the cache donated, so decode updates the
cache buffers in place.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from . import kernels
from . import sharding as shd
from .cache import Cache, cache_bytes, cache_shapes, init_cache
from .config import ModelConfig


def _forward(graphdef, params, tokens, cache, valid, *, num_iter, fresh, backend, last_only):
    model = nnx.merge(graphdef, params)
    return model(tokens, cache, valid, num_iter=num_iter, fresh=fresh, backend=backend, last_only=last_only)


forward = jax.jit(_forward, static_argnums=(0,),
                  static_argnames=("num_iter", "fresh", "backend", "last_only"), donate_argnames=("cache",))


class ContextOverflowError(ValueError):
    """More tokens than the cache (or the model's context) can hold."""


@dataclasses.dataclass
class Model:
    """A loaded hybrid GKA model. ``model(tokens)`` returns logits [B, T, vocab] (float32)."""

    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    mesh: jax.sharding.Mesh | None = None
    num_iter: int | None = None      # default Chebyshev iterations (None: the config's)
    backend: str | None = None       # GKA kernel backend (None: automatic)
    eos_token_ids: tuple = ()        # tokens that end generation (from generation_config.json)
    tokenizer: object = None         # set by load() when the folder has tokenizer files

    @property
    def dtype(self):
        return jax.tree.leaves(self.params)[0].dtype

    @property
    def module(self):
        """The NNX module (parameters only), e.g. for fine-tuning with ``nnx`` transforms."""
        return nnx.merge(self.graphdef, self.params)

    def astype(self, dtype) -> "Model":
        """The same model with parameters cast to ``dtype`` (float64 needs ``jax.enable_x64``)."""
        params = jax.tree.map(lambda x: x.astype(dtype), self.params)
        return dataclasses.replace(self, params=params)

    def shard(self, mesh: jax.sharding.Mesh) -> "Model":
        """The same model with every parameter placed by the sharding rules on ``mesh``."""
        shardings = shd.param_shardings(self.params, mesh)
        return dataclasses.replace(self, params=jax.device_put(self.params, shardings), mesh=mesh)

    @property
    def kernel_backend(self):
        """The GKA kernel backend the jitted functions get. On a multi-device mesh the Pallas kernels (which
        XLA cannot partition: they are single-device custom calls) run once per shard under ``shard_map``
        (``kernels.PerShard``); the XLA path is partitioned by XLA itself."""
        if self.mesh is None or self.mesh.devices.size == 1:
            return self.backend
        platform = self.mesh.devices.flat[0].platform
        name = kernels.select_backend(self.backend, platform=platform)   # refuses impossible explicit choices
        return name if name == "xla" else kernels.PerShard(self.backend, self.mesh)

    def _num_iter(self, num_iter):
        n = self.num_iter if num_iter is None else num_iter
        n = self.config.gka.num_iter if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"num_iter must be an integer >= 0, got {n!r}")
        return n

    # ------------------------------------------------------------------ caches
    def cache_bytes(self, batch: int, max_length: int, state_dtype=jnp.float32) -> int:
        return cache_bytes(self.config, batch, max_length, self.dtype, state_dtype)

    def init_cache(self, batch: int, max_length: int, state_dtype=jnp.float32) -> Cache:
        """An empty cache for ``batch`` rows of up to ``max_length`` tokens (sharded on the mesh if any)."""
        if batch < 1 or max_length < 1:
            raise ValueError(f"batch and max_length must be >= 1, got {batch}, {max_length}")
        build = functools.partial(init_cache, self.config, batch, max_length, self.dtype, state_dtype)
        if self.mesh is None:
            return jax.jit(build)()
        shapes = cache_shapes(self.config, batch, max_length, self.dtype, state_dtype)
        return jax.jit(build, out_shardings=shd.cache_shardings(shapes, self.mesh))()

    # ------------------------------------------------------------------ running
    def _run(self, tokens, cache, valid, num_iter, fresh, last_only):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids of shape [B, T], got {tokens.dtype}{list(tokens.shape)}")
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"tokens have batch {tokens.shape[0]} but the cache was made for {cache.batch_size}")
        if valid is None:
            valid = jnp.ones(tokens.shape, bool)
        valid = jnp.asarray(valid, bool)
        if valid.shape != tokens.shape:
            raise ValueError(f"valid has shape {list(valid.shape)}, tokens {list(tokens.shape)}")
        return forward(self.graphdef, self.params, tokens.astype(jnp.int32), cache, valid,
                       num_iter=self._num_iter(num_iter), fresh=fresh, backend=self.kernel_backend, last_only=last_only)

    def prefill(self, tokens, cache: Cache | None = None, *, max_length: int | None = None, valid=None,
                num_iter: int | None = None, last_only: bool = False):
        """Process prompts [B, T] into an empty cache (a new one of ``max_length``, default T).

        Returns (logits [B, T, V] (or [B, 1, V] with ``last_only``), cache). ``valid`` [B, T] marks real
        tokens when rows have different lengths (padding at the end of a row).
        """
        tokens = jnp.asarray(tokens)
        if cache is None:
            max_length = tokens.shape[-1] if max_length is None else max_length
            cache = self.init_cache(tokens.shape[0], max_length)
        if tokens.shape[-1] > cache.max_length:
            raise ContextOverflowError(f"the prompt has {tokens.shape[-1]} tokens but the cache holds "
                                       f"{cache.max_length}")
        return self._run(tokens, cache, valid, num_iter, fresh=True, last_only=last_only)

    def extend(self, tokens, cache: Cache, *, valid=None, num_iter: int | None = None, last_only: bool = False,
               check_length: bool = True):
        """Append tokens [B, T] to a non-empty cache (decode when T = 1); returns (logits, cache).

        The input cache is donated: use the returned one.
        """
        tokens = jnp.asarray(tokens)
        if check_length:
            longest = int(jnp.max(cache.lengths)) + tokens.shape[-1]
            if longest > cache.max_length:
                raise ContextOverflowError(f"the cache holds {cache.max_length} tokens; this step needs {longest}")
        return self._run(tokens, cache, valid, num_iter, fresh=False, last_only=last_only)

    def decode(self, tokens, cache: Cache, *, valid=None, num_iter: int | None = None, check_length: bool = True):
        """One new token per row: tokens [B] -> (logits [B, V], cache). ``valid`` [B] False freezes a row."""
        tokens = jnp.asarray(tokens).reshape(-1, 1)
        valid = None if valid is None else jnp.asarray(valid, bool).reshape(-1, 1)
        logits, cache = self.extend(tokens, cache, valid=valid, num_iter=num_iter, check_length=check_length)
        return logits[:, 0], cache

    def __call__(self, tokens, *, num_iter: int | None = None):
        """Logits [B, T, vocab] float32 for token ids [B, T] (a full causal forward, no cache kept)."""
        logits, _ = self.prefill(tokens, num_iter=num_iter)
        return logits
